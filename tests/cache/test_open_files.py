"""Chunk files kept open for batched cache reads: bounded, closed when pushed out, forgotten with a damaged shard."""

from __future__ import annotations

import os

import pytest

from mmloader.cache.files import OPEN_FILES_ENV, OpenFiles, default_capacity


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux) to count descriptors")
def test_at_most_capacity_descriptors_stay_open(tmp_path):
    paths = []
    for k in range(5):
        (tmp_path / f"s{k}").mkdir()
        paths.append(tmp_path / f"s{k}" / "c.0")
        paths[-1].write_bytes(bytes([k]) * 8)
    before = _open_fds()
    files = OpenFiles(3)
    for p in paths:
        fd, kept = files.fd(str(p))
        assert kept and os.pread(fd, 1, 3) == bytes([paths.index(p)])
    assert len(files) == 3 and _open_fds() == before + 3  # the two least recently used were closed
    assert files.fd(str(paths[4]))[0] == files.fd(str(paths[4]))[0]  # kept: the same descriptor again
    files.forget(str(tmp_path / "s4"))
    assert len(files) == 2 and _open_fds() == before + 2
    files.forget(str(tmp_path / "s"))  # a prefix that is not a folder of theirs closes nothing
    assert len(files) == 2
    files.close()
    assert len(files) == 0 and _open_fds() == before

    off = OpenFiles(0)  # nothing kept: the caller closes what it gets
    fd, kept = off.fd(str(paths[0]))
    assert not kept and _open_fds() == before + 1
    os.close(fd)
    with pytest.raises(FileNotFoundError):
        files.fd(str(tmp_path / "absent"))


def test_the_capacity_follows_the_limit_or_the_environment(monkeypatch):
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    monkeypatch.delenv(OPEN_FILES_ENV, raising=False)
    want = 16384 if soft == resource.RLIM_INFINITY else min(16384, soft // 2)
    assert default_capacity() == want
    monkeypatch.setenv(OPEN_FILES_ENV, "0")
    assert default_capacity() == 0 and OpenFiles().capacity == 0
    monkeypatch.setenv(OPEN_FILES_ENV, "lots")
    with pytest.raises(ValueError, match=OPEN_FILES_ENV):
        default_capacity()


def test_out_of_descriptors_closes_the_older_half_and_goes_on(tmp_path):
    """With the process's open-file limit reached, the older half of the kept descriptors is closed and the open
    tried again (run in a child: it lowers its own limit)."""
    import subprocess
    import sys

    for k in range(40):
        (tmp_path / f"f{k}").write_bytes(bytes([k]))
    code = f"""
import os, resource
from mmloader.cache.files import OpenFiles
n = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 12, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
files = OpenFiles(100)
for k in range(40):
    fd, kept = files.fd(os.path.join({str(tmp_path)!r}, f"f{{k}}"))
    assert kept and os.pread(fd, 1, 0) == bytes([k])
assert files.capacity < 12 and len(files) <= files.capacity
print("ok", files.capacity)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


def test_clearing_a_cache_closes_its_kept_files(tmp_path):
    from mmloader.cache import clear
    from mmloader.cache.files import shared_files

    (tmp_path / "c" / "shards").mkdir(parents=True)
    chunk = tmp_path / "c" / "shards" / "c.0"
    chunk.write_bytes(b"x")
    files = shared_files()
    files.fd(str(chunk))
    assert str(chunk) in list(files._paths())
    assert clear(str(tmp_path / "c"), force=True)
    assert str(chunk) not in list(files._paths()) and not (tmp_path / "c").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_free_lock():
    """A child forked while another thread holds the shared lock can still read (the lock is made afresh)."""
    import threading

    from mmloader.cache.files import shared_files

    files = shared_files()
    held, done = threading.Event(), threading.Event()

    def hold():
        with files.lock:
            held.set()
            done.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the lock can be taken
            os._exit(0 if shared_files().lock.acquire(timeout=2) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        done.set()
        t.join()
