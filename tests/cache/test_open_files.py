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
