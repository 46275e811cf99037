"""setup and remove of N students against the plain baseline a sysadmin would write.

Run as root:  python benchmarks/bench_accounts.py [--students 200] [--rounds 1]

Side by side in one run, on the same machine, alternating:
  baseline setup   a shell loop of `useradd -m` and one `chpasswd` batch
  classroom setup  `notebooks.py setup CONFIG`
  baseline remove  a shell loop of `tar czf` and `userdel -r`
  classroom remove `notebooks.py remove CONFIG --yes` (archives included)
It prints the wall times and the ratios classroom / baseline.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(argv, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, **kw)
    return time.perf_counter() - t


def baseline_setup(names: list[str], home_base: Path) -> float:
    script = 'for u in "$@"; do useradd -m -b "$HB" "$u"; done'
    t = time.perf_counter()
    subprocess.run(
        ["sh", "-c", script, "sh", *names], check=True, env={**os.environ, "HB": str(home_base)}
    )
    batch = "".join(f"{u}:{secrets.token_urlsafe(9)}\n" for u in names)
    subprocess.run(["chpasswd"], input=batch, text=True, check=True)
    return time.perf_counter() - t


def baseline_remove(names: list[str], home_base: Path, archive: Path) -> float:
    script = 'for u in "$@"; do tar czf "$AR/$u.tar.gz" -C "$HB" "$u" && userdel -r "$u" 2>/dev/null; done'
    t = time.perf_counter()
    subprocess.run(
        ["sh", "-c", script, "sh", *names],
        check=True,
        env={**os.environ, "HB": str(home_base), "AR": str(archive)},
    )
    return time.perf_counter() - t


def course_files(base: Path, names: list[str], home_base: Path) -> Path:
    (base / "students.csv").write_text(
        "username,name,surname\n" + "".join(f"{u},N,S\n" for u in names)
    )
    cfg = base / "notebooks.cfg"
    cfg.write_text(
        f"[course]\nname = bench-{secrets.token_hex(3)}\nroster = students.csv\n"
        f"state_dir = {base / 'state'}\n[accounts]\nhome_base = {home_base}\n"
    )
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--students", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it creates and deletes real accounts")
    results: dict[str, list[float]] = {
        k: [] for k in ("base_setup", "ours_setup", "base_remove", "ours_remove")
    }
    for _ in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="bench-accounts-", dir="/tmp"))
        os.chmod(work, 0o755)
        try:
            hb1, hb2, ar = work / "h1", work / "h2", work / "archive"
            for d in (hb1, hb2, ar):
                d.mkdir(mode=0o755)
            base_names = [f"bb{secrets.token_hex(3)}{i}" for i in range(args.students)]
            our_names = [f"bo{secrets.token_hex(3)}{i}" for i in range(args.students)]
            cfg = course_files(work, our_names, hb2)
            try:
                results["base_setup"].append(baseline_setup(base_names, hb1))
                results["ours_setup"].append(
                    timed([sys.executable, str(ROOT / "notebooks.py"), "-q", "setup", str(cfg)])
                )
                results["base_remove"].append(baseline_remove(base_names, hb1, ar))
                results["ours_remove"].append(
                    timed(
                        [
                            sys.executable,
                            str(ROOT / "notebooks.py"),
                            "-q",
                            "remove",
                            str(cfg),
                            "--yes",
                        ]
                    )
                )
            finally:
                for u in base_names + our_names:
                    subprocess.run(["userdel", "-r", "-f", u], capture_output=True, check=False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    n = args.students
    print(f"students: {n}, rounds: {args.rounds} (medians)")
    print(
        f"setup:  baseline {med['base_setup']:.2f} s, classroom {med['ours_setup']:.2f} s, "
        f"ratio {med['ours_setup'] / med['base_setup']:.2f} (target <= 1.2)"
    )
    print(
        f"remove: baseline {med['base_remove']:.2f} s, classroom {med['ours_remove']:.2f} s, "
        f"ratio {med['ours_remove'] / med['base_remove']:.2f} (target <= 1.5)"
    )


if __name__ == "__main__":
    main()
