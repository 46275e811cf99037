"""Acting as a student in the tests: run code as one, write their files, find and end their
processes, and the tricks a hostile student plays (SPEC §6.11).

Every student here is a throw-away test account (see conftest): never one of the host's
real users.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

from conftest import PYTHON


def student_ids(course, username: str) -> tuple[int, int, list[int]]:
    """The student's uid, gid and groups."""
    pw = course.pw(username)
    return pw.pw_uid, pw.pw_gid, os.getgrouplist(username, pw.pw_gid)


def as_student(course, username: str, code: str, *args: str, **popen) -> subprocess.Popen:
    """Start ``python -c CODE ARGS`` as the student (uid, gid, groups), in their home and a
    session of its own; stdin, stdout and stderr are /dev/null unless ``popen`` says else."""
    uid, gid, groups = student_ids(course, username)
    home = str(course.home(username))
    popen.setdefault("stdin", subprocess.DEVNULL)
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(
        [PYTHON, "-c", code, *args],
        user=uid,
        group=gid,
        extra_groups=groups,
        env={"HOME": home, "USER": username, "PATH": "/usr/local/bin:/usr/bin:/bin"},
        cwd=home,
        start_new_session=True,
        **popen,
    )


def run_as_student(course, username: str, code: str, *args: str, timeout: float = 120) -> str:
    """Run ``python -c CODE ARGS`` as the student to the end; its stdout (it must succeed)."""
    proc = as_student(
        course, username, code, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    return out


def write_as(course, username: str, path: str | Path, content: str | bytes) -> Path:
    """Write ``path`` (relative to the student's home, or absolute inside it) as the student
    would: the file and every folder made for it (0700) belong to the student. A new file gets
    the umask's mode, an existing one keeps its own."""
    pw = course.pw(username)
    home = course.home(username)
    path = home / path
    for parent in reversed(path.relative_to(home).parents):
        folder = home / parent
        if not folder.exists():
            folder.mkdir(mode=0o700)
            os.chown(folder, pw.pw_uid, pw.pw_gid)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


def processes_of_uid(uid: int) -> list[str]:
    """Live (not zombie) processes with ``uid`` as any of their four uids: 'PID name' each."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        uids = {int(x) for x in fields.get("Uid", "").split()}
        if uid in uids and not fields.get("State", "").strip().startswith(("Z", "X")):
            found.append(f"{entry} {fields.get('Name', '').strip()}")
    return found


KILL_UID = """
import os, signal, sys, time
uid, me = int(sys.argv[1]), os.getpid()


def left():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if uid in {int(x) for x in fields["Uid"].split()} and fields["State"].split()[0] not in "ZX":
            found.append(entry)
    return found


os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(uid)
quiet = 0
for _ in range(2000):  # a forking loop may slip through one kill(-1): until none is left
    os.kill(-1, signal.SIGKILL)  # succeeds even when it signalled nothing: look in /proc
    quiet = 0 if left() else quiet + 1
    if quiet == 5:
        sys.exit(0)
    time.sleep(0.01)
sys.exit(f"processes of uid {uid} are still left: {left()}")
"""


def kill_uid(uid: int, gid: int) -> None:
    """Kill every process of ``uid`` (stopped ones too), from a process of that uid, until none
    is left (the test's own cleanup; the account may be gone already)."""
    assert uid >= 1000
    subprocess.run([PYTHON, "-c", KILL_UID, str(uid), str(gid)], timeout=120, check=True)


# --- a hostile student's tricks -----------------------------------------------------------------

STOPPER = r"""
import os, signal, sys, time
pulse = float(sys.argv[1])  # seconds between SIGCONT pulses (a watchdog then sees progress)
print("ready", flush=True)
last = time.monotonic()
while True:
    try:
        os.kill(-1, signal.SIGSTOP)  # every process of mine but this one
    except ProcessLookupError:
        pass
    if pulse and time.monotonic() - last > pulse:  # a moment of progress now and then
        os.kill(-1, signal.SIGCONT)
        time.sleep(0.001)
        last = time.monotonic()
    time.sleep(0.0005)
"""


@contextlib.contextmanager
def stopper(course, username: str, pulse: float = 0.0):
    """As the student: SIGSTOP every other process of theirs as soon as it appears (and let
    them run for a moment every ``pulse`` seconds, if given); afterwards kill them all."""
    proc = as_student(course, username, STOPPER, str(pulse), stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        uid, gid, _ = student_ids(course, username)
        kill_uid(uid, gid)  # what it stopped (SIGKILL ends a stopped process too)


# ``python -c SQUAT try|hold PORT...``: bind [::]:PORT with IPV6_V6ONLY on each port; prints
# {port: "bound" or errno}; with "hold", keeps the sockets until stdin closes.
SQUAT = r"""
import json, socket, sys
hold = sys.argv[1] == "hold"
results, held = {}, []
for port in map(int, sys.argv[2:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("::", port))
        s.listen()
        results[port] = "bound"
        held.append(s)
    except OSError as exc:
        results[port] = exc.errno
        s.close()
print(json.dumps(results), flush=True)
if hold:
    sys.stdin.read()  # hold the sockets until the test closes stdin
"""


@contextlib.contextmanager
def squatting(course, username: str, *ports: int):
    """As the student: hold [::]:PORT (IPv6 only) on each port until the block ends; yields
    what SQUAT printed ({"PORT": "bound" or an errno})."""
    holder = as_student(
        course,
        username,
        SQUAT,
        "hold",
        *map(str, ports),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,  # the test's: why the squatter failed, if it did
    )
    try:
        assert holder.stdout is not None
        yield json.loads(holder.stdout.readline())
    finally:
        if holder.stdin:
            holder.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


# ``python -c FLOOD LINKS FOLDERS`` in the student's ~/tutorial: FOLDERS empty folders,
# 15 nested 255-character folders with LINKS symlinks at the bottom, and one real edit.
FLOOD = r"""
import os, sys
links, folders = int(sys.argv[1]), int(sys.argv[2])
base = os.path.join(os.path.expanduser("~"), "tutorial")
fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
for i in range(folders):  # many empty folders
    os.mkdir(f"f{i:06d}", dir_fd=fd)
for depth in range(15):  # 15 nested folders with 255-character names
    name = (f"{depth:02d}" + "d" * 255)[:255]
    os.mkdir(name, dir_fd=fd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
for i in range(links):  # at the bottom, many symlinks: each one is a skipped entry
    os.symlink("/etc/passwd", f"l{i:06d}", dir_fd=fd)
with open(os.path.join(base, "lesson.ipynb"), "a") as f:  # and one real edit
    f.write("\n# my answer\n")
"""

# File names that would move the cursor, retitle the terminal or colour it, were they printed raw.
HOSTILE_NAMES = ["\x1b]0;pwned\x07title.txt", "\x1b[2K\x1b[1A started.py", "csi\u009b31mred.txt"]


def memory_contains(pid: int, needles: list[bytes]) -> set[bytes]:
    """Which of ``needles`` occur in any readable region of /proc/PID/mem (as root)."""
    found: set[bytes] = set()
    longest = max(len(n) for n in needles)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            tail = b""
            offset = start
            while offset < end:
                size = min(1 << 22, end - offset)
                try:
                    mem.seek(offset)
                    chunk = mem.read(size)
                except (OSError, OverflowError, ValueError):
                    break
                data = tail + chunk
                for needle in needles:
                    if needle in data:
                        found.add(needle)
                tail = data[-longest:]
                offset += size
    return found


def find_hashed_password(home: Path) -> tuple[Path, str] | None:
    """The file in the student's ~/.jupyter that holds a hashed Jupyter password, and the
    hash; None if there is none."""
    for f in sorted((home / ".jupyter").glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(f.read_text())
            for section, key in (
                ("IdentityProvider", "hashed_password"),
                ("PasswordIdentityProvider", "hashed_password"),
                ("ServerApp", "password"),
            ):
                value = data.get(section, {}).get(key)
                if value:
                    return f, value
    return None


def hashed_password(home: Path) -> tuple[Path, str]:
    """``find_hashed_password``, which must find one."""
    found = find_hashed_password(home)
    assert found, f"no Jupyter password hash under {home / '.jupyter'}"
    return found
