"""The window cache: exact reads, atomic and checksummed shards, concurrent writers, invalidation, CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmloader
from mmloader.recipes.ego4d.recipe import Ego4DAdapter
from mmloader.cache import PAUSE_ENV, CachedWindows, CacheError, WindowCache, cache_root, cache_windows, list_caches
from mmloader.cli import main
from mmloader.windows.collate import collate
from mmloader.samples import generate_ego4d_sample
from mmloader.windows.dataset import WindowSet
from mmloader.windows.protocol import Windows

SPEC = dict(sec=1, stride=0.5, modalities=["imu", "video"], frames=2, size=(32, 40))
CLI_SPEC = ["--sec", "1", "--stride", "0.5", "--modalities", "imu", "video", "--frames", "2", "--size", "32", "40"]
K = 8  # windows per shard in these tests


@pytest.fixture(scope="module")
def sample(sample_store):
    """A small store, its windows and every window read without a cache (the reference)."""
    store = sample_store(videos=3, seconds=16, seed=2, defect_fraction=0.0)
    windows = mmloader.open(store).windows(**SPEC)
    assert len(windows) > 4 * K
    return store, windows, [windows[i] for i in range(len(windows))]


def assert_same(a: dict, b: dict) -> None:
    """Same keys in the same order; tensors with the same dtype, shape and bytes; other values equal."""
    assert list(a) == list(b)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, key
            assert x.contiguous().view(torch.uint8).numpy().tobytes() == y.contiguous().view(torch.uint8).numpy().tobytes(), key
        else:
            assert type(x) is type(y) and x == y, key


class NoSource:
    """Stands in for the store once a cache is complete: the index is there, any read from the store fails."""

    def __init__(self, windows: WindowSet):
        self.index_fields = windows.index_fields

    def __getitem__(self, i):
        raise AssertionError(f"window {i} was read from the store, not the cache")


class TinyWindows:
    """A window set held in memory that is not a WindowSet: the Windows protocol and nothing else."""

    def __init__(self, n: int = 11):
        self.n = n

    def __len__(self):
        return self.n

    def index_fields(self, i):
        i = range(self.n)[i]
        return {"recording_id": f"rec{i % 3}", "t0": i * 0.5, "t1": i * 0.5 + 1.0, "index": i,
                "text": [f"narration {i}"] * (i % 2)}

    def __getitem__(self, i):
        fields = self.index_fields(i)
        i = fields["index"]
        g = torch.Generator().manual_seed(i)
        return {"recording_id": fields["recording_id"], "t0": fields["t0"], "t1": fields["t1"], "index": i,
                "x": torch.randn(3, 4 + i % 2, generator=g), "x_mask": torch.arange(5) < i % 5,
                "emb": torch.randn(6, generator=g).to(torch.bfloat16), "text": fields["text"]}

    def fingerprint_components(self):
        return {"kind": "tiny", "n": self.n}


def row_bytes(array_dir: Path, row: int) -> tuple[Path, slice]:
    """The chunk file of a cached array (one chunk holds every row) and the byte range of ``row`` in it."""
    rows = json.loads((array_dir / "zarr.json").read_text())["shape"][0]
    (chunk,) = array_dir.glob("c.*")
    n = chunk.stat().st_size // rows
    return chunk, slice(row * n, (row + 1) * n)


def flip(array_dir: Path, row: int, at: int, bit: int = 0x01) -> Path:
    """Flip ``bit`` of byte ``at`` of row ``row`` of a cached array; returns its chunk file."""
    chunk, where = row_bytes(array_dir, row)
    raw = bytearray(chunk.read_bytes())
    raw[where.start + at] ^= bit
    chunk.write_bytes(bytes(raw))
    return chunk


def cli_build(url, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmloader.cli", "cache", "build", *extra, *CLI_SPEC, "--url", str(url),
            "--shard-size", str(K), "-q"]


# -- exactness -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill,workers", [("lazy", 0), ("lazy", 2), ("eager", 0), ("eager", 2)])
def test_cached_windows_are_bit_identical(sample, tmp_path, fill, workers):
    store, windows, ref = sample
    cached = windows.cache(str(tmp_path / "c"), fill=fill, progress=False, shard_size=K)
    cache = cached.window_cache
    if fill == "eager":
        assert cache.status()["shards_complete"] == cache.n_shards
    for epoch in range(2):  # lazy: the first epoch fills (in the workers, if any); the second is all hits
        if epoch == 1:
            assert cache.status()["complete"] == list(range(cache.n_shards))
            cache.source = NoSource(windows)  # from now on a read from the store fails the test
        seen = []
        for batch in cached.loader(batch_size=5, shuffle=True, seed=epoch, num_workers=workers):
            expected = collate([ref[i] for i in batch["index"].tolist()])
            assert_same(batch, expected)
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(len(windows)))
    for i in (0, len(windows) - 1):
        assert_same(cached[i], ref[i])
    assert cache.validate() == []


def test_cache_is_generic_over_tensor_keys(sample, tmp_path):
    """Derived tensors (any name, dtype numpy lacks, shapes that vary per window) are cached the same way."""
    store, windows, ref = sample

    class WithEmbedding(WindowSet):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            s["clip.emb"] = torch.linspace(0, 1, 6, dtype=torch.float32).to(torch.bfloat16) * (i % 5)
            s["tokens"] = torch.arange(i % 3 + 1, dtype=torch.int64)
            return s

    source = WithEmbedding(windows.store, windows.spec, windows.index)
    cached = source.cache(str(tmp_path / "c"), shard_size=K, transforms="emb-v1")
    for i in range(len(windows)):
        assert_same(cached[i], source[i])
    cached.window_cache.source = NoSource(windows)
    for i in range(len(windows)):
        assert_same(cached[i], source[i])


def test_the_cache_wraps_any_windows(tmp_path):
    """Not only WindowSets: a plain object with the Windows protocol is cached and served bit-identically."""
    tiny = TinyWindows()
    assert isinstance(tiny, Windows) and not isinstance(tiny, WindowSet)
    ref = [tiny[i] for i in range(len(tiny))]
    cached = cache_windows(tiny, str(tmp_path / "c"), shard_size=4)
    assert isinstance(cached, CachedWindows) and isinstance(cached, Windows) and len(cached) == len(tiny)
    for i in range(len(tiny)):  # lazy: the first read of a shard fills it
        assert_same(cached[i], ref[i])
    assert cached.window_cache.status()["complete"] == [0, 1, 2]
    assert_same(cached[-1], ref[-1])
    with pytest.raises(IndexError):
        cached[len(tiny)]

    class Gone(TinyWindows):
        def __getitem__(self, i):
            raise AssertionError(f"window {i} was read from the source, not the cache")

    cached.window_cache.source = Gone()
    for i in range(len(tiny)):
        assert_same(cached[i], ref[i])
    seen = []
    unstacked = lambda samples: {"index": [s["index"] for s in samples], "samples": samples}  # noqa: E731
    for batch in cached.loader(batch_size=4, shuffle=True, seed=1, collate_fn=unstacked):  # shapes vary
        for s in batch["samples"]:
            assert_same(s, ref[s["index"]])
            seen.append(s["index"])
    assert sorted(seen) == list(range(len(tiny)))
    again = WindowCache.open(TinyWindows(), str(tmp_path / "c"), shard_size=4)  # the same fingerprint
    assert again.fingerprint == cached.window_cache.fingerprint and again.validate() == []
    with pytest.raises(CacheError, match="another window set"):
        cache_windows(TinyWindows(12), str(tmp_path / "c"), shard_size=4)
    with pytest.raises(TypeError, match="Windows"):
        cache_windows([{"x": torch.zeros(1)}], str(tmp_path / "d"))


def test_a_cached_set_behaves_like_its_source(sample, tmp_path):
    """len, report, index, spec, iteration as the source; selections are uncached; cache() again re-caches the source."""
    store, windows, ref = sample
    cached = windows.cache(str(tmp_path / "c"), shard_size=K)
    assert len(cached) == len(windows) and cached.report() == windows.report()
    assert cached.index is windows.index and cached.spec == windows.spec and cached.source is windows
    assert cached.fingerprint_components() == windows.fingerprint_components()
    assert cached.index_fields(3) == windows.index_fields(3)
    assert windows.window_cache is None and cached.window_cache.url == str(tmp_path / "c")
    first = next(iter(cached))
    assert_same(first, ref[0])
    sel = cached.filter(lambda r: r["t0_ns"] % 2 == 0)
    assert type(sel) is WindowSet and sel.window_cache is None
    other = cached.cache(str(tmp_path / "d"), shard_size=K)
    assert other.source is windows and other.window_cache.fingerprint == cached.window_cache.fingerprint
    assert_same(other[len(windows) - 1], ref[-1])


def test_a_key_the_index_cannot_rebuild_is_refused(sample, tmp_path):
    store, windows, ref = sample

    class WithNote(WindowSet):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "note": f"window {i}"}

    cached = WithNote(windows.store, windows.spec, windows.index).cache(str(tmp_path / "c"), shard_size=K)
    with pytest.raises(CacheError, match="'note'"):
        cached[0]


# -- atomicity and checksums ---------------------------------------------------------------------------
def test_writer_killed_mid_shard_is_detected_and_repaired(sample, tmp_path):
    store, windows, ref = sample
    url = tmp_path / "c"
    proc = subprocess.Popen(cli_build(url, store), env={**os.environ, PAUSE_ENV: "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # shards 0 and 1 are published; shard 2's data is written, not committed
            if "paused before committing shard 2" in line:
                break
        else:
            pytest.fail(f"the builder exited ({proc.wait()}) without reaching shard 2")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    st = WindowCache.inspect(str(url)).status()
    assert st["complete"] == [0, 1] and st["torn"] == [2] and st["corrupt"] == []
    assert any("shard 2" in p for p in st["problems"]) and len(st["leftovers"]) == 1
    assert main(["cache", "info", str(url), "--verify"]) == 1  # the CLI reports it too

    cached = windows.cache(str(url), shard_size=K)  # the same fingerprint as the killed builder's
    for i in range(2 * K, 3 * K):  # a read repairs the torn shard (and removes the dead writer's leftovers)
        assert_same(cached[i], ref[i])
    st = cached.window_cache.status()
    assert st["complete"] == [0, 1, 2] and st["torn"] == [] and st["leftovers"] == []
    assert subprocess.run(cli_build(url, store), capture_output=True).returncode == 0  # the next build completes it
    st = cached.window_cache.status()
    assert st["shards_complete"] == st["shards_total"] and st["problems"] == []
    cached.window_cache.source = NoSource(windows)
    for i in range(len(windows)):
        assert_same(cached[i], ref[i])


def test_torn_shard_on_an_object_store_is_a_miss(sample, monkeypatch):
    """Object stores (here memory://) publish by writing COMMIT.json last: data without it is never served."""
    store, windows, ref = sample
    url = "memory://mmloader-test-cache/torn"

    def crash(k):
        if k == 1:
            raise RuntimeError("writer died")

    monkeypatch.setattr("mmloader.cache.testhooks.pause_before_commit", crash)
    with pytest.raises(RuntimeError, match="writer died"):
        windows.cache(url, fill="eager", progress=False, shard_size=K)
    monkeypatch.undo()
    cache = WindowCache.inspect(url)
    st = cache.status()
    assert st["complete"] == [0] and st["torn"] == [1]
    cached = windows.cache(url, shard_size=K)
    assert_same(cached[K + 3], ref[K + 3])
    assert cached.window_cache.verify_shard(1) == ("complete", "")
    cached.window_cache.fill(progress=False)
    assert cached.window_cache.validate() == []
    cached.window_cache.source = NoSource(windows)
    for i in range(len(windows)):
        assert_same(cached[i], ref[i])


def test_flipped_byte_is_detected_and_rebuilt_never_served(sample, tmp_path):
    store, windows, ref = sample
    cached = windows.cache(str(tmp_path / "c"), fill="eager", progress=False, shard_size=K)
    cache = cached.window_cache
    assert_same(cached[K + 3], ref[K + 3])  # the shard is open in this process
    chunk, _ = row_bytes(tmp_path / "c" / "shards" / "000001" / "video", 3)
    good = chunk.read_bytes()
    flip(tmp_path / "c" / "shards" / "000001" / "video", 3, 100)
    st = cache.status()
    assert st["corrupt"] == [1] and "checksum" in st["problems"][0]
    assert_same(cached[K + 3], ref[K + 3])  # the mismatch is a miss: read from the store, shard rebuilt
    assert chunk.read_bytes() == good
    assert cache.validate() == []

    # a flip in another key and shard, found and repaired by the next eager fill
    chunk = flip(tmp_path / "c" / "shards" / "000002" / "imu", 5, 7, 0x80)
    assert cache.status()["corrupt"] == [2]
    assert cache.fill(progress=False)["filled"] == 1
    assert cache.validate() == []
    # a truncated chunk and a damaged commit record are corrupt too
    chunk.write_bytes(chunk.read_bytes()[:-4])
    (tmp_path / "c" / "shards" / "000003" / "COMMIT.json").write_text("{not json")
    assert cache.status()["corrupt"] == [2, 3]
    cache.source = NoSource(windows)
    with pytest.raises(AssertionError, match="read from the store"):
        cached[2 * K + 5]  # never served from the damaged chunk


# -- concurrency ---------------------------------------------------------------------------------------
def test_two_concurrent_builders_leave_a_valid_cache(sample, tmp_path):
    store, windows, ref = sample
    url = tmp_path / "c"
    env = {**os.environ, PAUSE_ENV: "*:0.15"}  # slow every publish down so that the two builds overlap
    procs = [subprocess.Popen(cli_build(url, store), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    fingerprints = {line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("fingerprint")}
    assert len(fingerprints) == 1
    filled = [int(re.search(r"filled (\d+),", out).group(1)) for out, _ in outs]
    assert sum(filled) == -(-len(windows) // K)  # the fill locks shared the work: every shard written once
    cache = WindowCache.inspect(str(url))
    st = cache.status()
    assert st["shards_complete"] == st["shards_total"] and st["problems"] == [] and st["leftovers"] == []
    cached = windows.cache(str(url), shard_size=K)
    cached.window_cache.source = NoSource(windows)
    for i in range(len(windows)):
        assert_same(cached[i], ref[i])


def test_publishing_over_a_published_or_corrupt_shard(sample, tmp_path):
    """Two writers of one shard: the second finds a valid copy and keeps it; a corrupt copy is replaced."""
    store, windows, ref = sample
    a = windows.cache(str(tmp_path / "c"), shard_size=K).window_cache
    b = windows.cache(str(tmp_path / "c"), shard_size=K).window_cache
    a._fill_shard(0)
    b._fill_shard(0)
    assert a.verify_shard(0) == ("complete", "")
    chunk, row = row_bytes(tmp_path / "c" / "shards" / "000000" / "imu_mask", 1)
    raw = bytearray(chunk.read_bytes())
    raw[row] = b"\x00" * (row.stop - row.start)
    chunk.write_bytes(bytes(raw))
    assert b.verify_shard(0)[0] == "corrupt"
    b._fill_shard(0)
    assert a.verify_shard(0) == ("complete", "") and a.status()["leftovers"] == []


def test_fill_locks(sample, tmp_path):
    """A held lock makes other readers serve from the store without writing; a dead owner's lock is broken."""
    store, windows, ref = sample
    cached = windows.cache(str(tmp_path / "c"), shard_size=K)
    cache = cached.window_cache
    lock = cache._lock(0)
    assert lock and cache._lock(0) is None
    other = windows.cache(str(tmp_path / "c"), shard_size=K)
    assert_same(other[2], ref[2])
    assert cache.verify_shard(0)[0] == "missing"
    cache._unlock(lock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    Path(cache.path, "locks", "000001.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead.stdout), "time": 0}))
    assert_same(other[K + 1], ref[K + 1])
    assert cache.verify_shard(1) == ("complete", "")


def test_metadata_creation_is_race_free_and_checked(sample, tmp_path):
    store, windows, ref = sample
    url = str(tmp_path / "c")
    caches = [WindowCache.open(windows, url, shard_size=K) for _ in range(3)]
    assert len({c.fingerprint for c in caches}) == 1
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["fingerprint"] == caches[0].fingerprint and meta["n_windows"] == len(windows)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["cache.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("not a cache")
    with pytest.raises(CacheError, match="not a window cache"):
        windows.cache(str(tmp_path / "other"), overwrite=True)
    assert (tmp_path / "other" / "data.txt").exists()


# -- invalidation --------------------------------------------------------------------------------------
def test_another_spec_or_transforms_does_not_reuse_the_cache(sample):
    store, windows, ref = sample
    a = windows.cache(shard_size=K)
    assert a.window_cache.url.startswith(cache_root()) and a.window_cache.url.endswith(a.window_cache.fingerprint)
    b = mmloader.open(store).windows(**{**SPEC, "frames": 1}).cache(shard_size=K)
    c = windows.cache(shard_size=K, transforms="normalize-v2")
    d = windows.split("train").cache(shard_size=K)  # another index
    e = windows.cache(shard_size=K)
    assert len({x.window_cache.fingerprint for x in (a, b, c, d)}) == 4
    assert e.window_cache.fingerprint == a.window_cache.fingerprint
    with pytest.raises(CacheError, match="another window set"):
        mmloader.open(store).windows(**{**SPEC, "frames": 1}).cache(a.window_cache.url)


def test_a_changed_store_does_not_reuse_the_cache(tmp_path, capsys):
    def prepare(seed):
        root = generate_ego4d_sample(tmp_path / f"src{seed}", videos=2, seconds=10, seed=seed, defect_fraction=0.0,
                                     progress=False)
        return Ego4DAdapter().prepare(str(root), str(tmp_path / "store"), overwrite=True, progress=False)

    spec = {**SPEC, "stride": 1.0}
    old = mmloader.open(prepare(0)).windows(**spec).cache(fill="eager", progress=False, shard_size=4)
    old_url = old.window_cache.url
    assert WindowCache.inspect(old_url).stale_reason() is None
    new_windows = mmloader.open(prepare(1)).windows(**spec)  # the same store URL, re-prepared from another source
    new = new_windows.cache(shard_size=4)
    assert new.window_cache.url != old_url
    assert WindowCache.inspect(old_url).stale_reason() == "store re-prepared from another source"
    with pytest.raises(CacheError, match="another window set"):
        new_windows.cache(old_url, shard_size=4)  # the old cache refuses to serve the new store
    for i in range(len(new_windows)):
        assert_same(new[i], new_windows[i])
    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "2 window cache(s)" in out and "STALE: store re-prepared from another source" in out
    assert main(["cache", "clear", "--stale"]) == 0
    assert list_caches() == [new.window_cache.url]


def test_overwrite_replaces_another_sets_cache(sample, tmp_path):
    store, windows, ref = sample
    url = str(tmp_path / "c")
    windows.cache(url, shard_size=K, transforms="v1", fill="eager", progress=False)
    with pytest.raises(CacheError, match="another window set"):
        windows.cache(url, shard_size=K)
    cached = windows.cache(url, shard_size=K, overwrite=True)
    assert cached.window_cache.status()["missing"] == list(range(cached.window_cache.n_shards))
    assert_same(cached[3], ref[3])


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_build_info_clear(sample, capsys):
    store, windows, ref = sample
    assert main(["cache", "build", store, *CLI_SPEC, "--shard-size", str(K), "-q"]) == 0
    out = capsys.readouterr().out
    url = next(line.split(None, 1)[1] for line in out.splitlines() if line.startswith("cache "))
    assert url.startswith(cache_root())
    assert main(["cache", "info", url, "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shards_complete"] == info["shards_total"] == -(-len(windows) // K)
    assert info["stale"] is None and info["spec"]["frames"] == 2 and info["bytes"] > 0
    assert main(["cache", "info", url]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "current" in out and "frames=2" in out
    assert main(["cache", "clear"]) == 2
    assert main(["cache", "clear", store]) == 1  # not a cache: refused, the store survives
    assert mmloader.open(store).validate() == []
    assert main(["cache", "clear", url]) == 0 and not os.path.exists(url)
    assert main(["cache", "build", store, *CLI_SPEC, "--shard-size", str(K), "-q"]) == 0
    assert main(["cache", "clear", "--all"]) == 0 and "removed 1 cache(s)" in capsys.readouterr().out
    assert main(["cache", "info"]) == 0 and "0 window cache(s)" in capsys.readouterr().out


def test_a_failed_write_warns_and_still_serves_exact_windows(sample, tmp_path, monkeypatch):
    store, windows, ref = sample
    cached = windows.cache(str(tmp_path / "c"), shard_size=K)
    cache = cached.window_cache

    def disk_full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "_publish", disk_full)
    with pytest.warns(RuntimeWarning, match="could not write shard 0"):
        assert_same(cached[1], ref[1])
    cache.source = NoSource(windows)  # the rest of the shard comes from memory, not from the store again
    for i in range(K):
        assert_same(cached[i], ref[i])
    assert cache.status()["missing"] == list(range(cache.n_shards))


def test_fill_cache_with_workers_builds_whole_shards_in_the_workers(sample, tmp_path):
    """``cache build --workers 2``: the workers fill every shard (contiguous runs), the windows are exact and the
    main process has nothing left to fill."""
    from mmloader.loader import fill_cache

    store, windows, ref = sample
    cached = windows.cache(str(tmp_path / "c"), fill="lazy", progress=False, shard_size=K)
    counts = fill_cache(cached, num_workers=2, progress=False)
    cache = cached.window_cache
    assert counts["filled_by_workers"] == cache.n_shards and counts["filled"] == 0
    assert counts["already_complete"] == 0
    cache.source = NoSource(windows)
    for i in range(len(windows)):
        assert_same(cached[i], ref[i])
    assert cache.validate() == []
    again = fill_cache(cached, num_workers=2, progress=False)  # nothing left to do
    assert again["filled_by_workers"] == 0 and again["already_complete"] == cache.n_shards


def test_cli_cache_build_with_workers(sample, tmp_path, capsys):
    store, windows, ref = sample
    assert main(["cache", "build", store, *CLI_SPEC, "--url", str(tmp_path / "c"), "--shard-size", str(K),
                 "--workers", "2", "-q"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"windows\s+(\d+) in (\d+) shards; filled 0, already complete 0, by workers (\d+)", out)
    assert m and m.group(2) == m.group(3), out


def test_a_cached_set_asks_loaders_for_whole_shards(sample, tmp_path):
    store, windows, ref = sample
    cached = windows.cache(str(tmp_path / "c"), fill="lazy", progress=False, shard_size=K)
    assert cached.run_alignment == K and not hasattr(windows, "run_alignment")


def test_batches_read_straight_from_shards_are_exact_and_damage_falls_back(sample, tmp_path):
    """``CachedWindows.read_batch``: complete shards → the batch read row by row into its tensors, equal to collating
    the windows; a window not cached yet, or a damaged row, → None, and the loader's window-by-window path serves
    (and repairs) it."""
    store, windows, ref = sample
    lazy = windows.cache(str(tmp_path / "lazy"), fill="lazy", progress=False, shard_size=K)
    assert lazy.read_batch([0, 1]) is None  # nothing cached yet
    cached = windows.cache(str(tmp_path / "c"), fill="eager", progress=False, shard_size=K)
    idx = [int(i) for i in torch.randperm(len(windows), generator=torch.Generator().manual_seed(5))[:23]]
    assert_same(cached.read_batch(idx), collate([ref[i] for i in idx]))
    assert_same(cached.read_batch([K + 3, 0]), collate([ref[K + 3], ref[0]]))
    files = cached.window_cache._files  # the chunk files of shards 0 and 1 are kept open now
    shard1 = str(tmp_path / "c" / "shards" / "000001") + "/"
    assert any(p.startswith(shard1) for p in files._paths())
    flip(tmp_path / "c" / "shards" / "000001" / "imu", 2, 5, 0x10)
    assert cached.read_batch([K + 1, K + 2]) is None
    assert not any(p.startswith(shard1) for p in files._paths())  # forgotten: the next reads open it afresh
    assert cached.read_batch([K + 1]) is not None
    batches = list(cached.loader(batch_size=2 * K, shuffle=False))
    for batch in batches:
        assert_same(batch, collate([ref[i] for i in batch["index"].tolist()]))
    assert cached.window_cache.validate() == []  # the damaged shard was rebuilt
