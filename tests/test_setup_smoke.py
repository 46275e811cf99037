import os
import stat

from conftest import needs_root


@needs_root
def test_setup_creates_then_unchanged(course):
    dry = course.run("setup", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for u in course.usernames:
        assert not course.home(u).exists()
    r = course.run("setup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"setup: {len(course.usernames)} created, 0 unchanged, 0 failed" in r.stdout
    for u in course.usernames:
        st = os.stat(course.home(u))
        assert stat.S_IMODE(st.st_mode) == 0o700
    again = course.run("setup")
    assert again.returncode == 0
    assert f"setup: {len(course.usernames)} unchanged, 0 failed" in again.stdout
