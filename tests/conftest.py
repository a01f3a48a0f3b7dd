"""Shared fixtures: small, deterministic, real files (mp4 encoded with PyAV, CSV, JSON)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from mmloader.recipes.ego4d.imu import HEADER


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never write to the user's cache from tests."""
    monkeypatch.setenv("MMLOADER_CACHE_DIR", str(tmp_path_factory.mktemp("mmcache")))


def write_mp4(path: Path, seconds: float = 2.0, fps: int = 10, size: tuple[int, int] = (64, 48), codec: str = "libx264") -> Path:
    """A real H.264 (or other codec) file whose frame k has mean brightness ~ 5*k."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * fps))
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height = size
        s.pix_fmt = "yuv420p"
        for k in range(n):
            img = np.full((size[1], size[0], 3), (5 * k) % 256, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def imu_rows(seconds: float, hz: float = 200.0, start_ms: float = 0.0, component: int = 0, offset_ms: float = 5e6):
    """Clean rows: canonical ms = t, accl = (t_sec, 0, 9.81), gyro = (0.1, 0.2, 0.3)."""
    n = int(seconds * hz)
    rows = []
    for i in range(n):
        t = start_ms + i * 1000.0 / hz
        rows.append([component, t + offset_ms, t, 0.1, 0.2, 0.3, t / 1000.0, 0.0, 9.81])
    return rows


def write_csv(path: Path, rows, header=HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join("" if v is None else (v if isinstance(v, str) else f"{v:.6f}" if isinstance(v, float) else str(v)) for v in r) + "\n")
    return path


def make_ego4d_tree(root: Path, uids=("vid-a", "vid-b"), seconds: float = 2.0, imu=True, narrations=True) -> Path:
    """A minimal Ego4D download: v2/ego4d.json, full_scale mp4s, IMU CSVs, narration.json."""
    videos = []
    narr = {}
    for i, uid in enumerate(uids):
        write_mp4(root / "v2" / "full_scale" / f"{uid}.mp4", seconds=seconds)
        if imu:
            write_csv(root / "v2" / "imu" / f"{uid}.csv", imu_rows(seconds))
        videos.append({
            "video_uid": uid, "duration_sec": seconds, "has_imu": imu, "split_fho": "train" if i == 0 else "val",
            "video_metadata": {"fps": 10.0, "num_frames": int(seconds * 10), "video_codec": "h264", "video_start_sec": 0.0},
        })
        narr[uid] = {"status": "complete", "narration_pass_1": {
            "narrations": [{"timestamp_sec": 0.5, "timestamp_frame": 5, "narration_text": "#C C walks along the corridor",
                            "annotation_uid": f"{uid}-n1"}],
            "summaries": [{"start_sec": 0.0, "end_sec": seconds, "summary_text": "#summary C walked", "annotation_uid": f"{uid}-s"}]}}
    (root / "v2").mkdir(parents=True, exist_ok=True)
    (root / "v2" / "ego4d.json").write_text(json.dumps({"version": "v2", "videos": videos, "clips": []}))
    if narrations:
        (root / "v2" / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "v2" / "annotations" / "narration.json").write_text(json.dumps(narr))
    return root


@pytest.fixture
def ego4d_tree(tmp_path) -> Path:
    return make_ego4d_tree(tmp_path / "ego4d")


def store_files(path: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


# -- sample stores: generated and prepared once per parameter set per session -------------------------------------
def _tree_state(*roots: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``roots``: what a test must leave as it found it."""
    return {os.path.join(str(r), rel): (st.st_size, st.st_mtime_ns)
            for r in roots for rel in store_files(r) for st in [os.stat(os.path.join(r, rel))]}


class SampleStores:
    """Sample stores shared by a test session: ``generate_ego4d_sample`` then the Ego4D recipe's ``prepare``.

    ``sample_store(videos=3, seconds=16, seed=2, defect_fraction=0.0, fps=30, size=(160, 120))`` returns the
    store's path (str), generating and preparing it once per distinct parameter set per session (``seconds``,
    ``fps`` in the generator's units: s and frames/s; ``size`` = (width, height) of the videos, px). Shared stores
    and their sources are read-only: a test that changes a store (tamper, delete, overwrite) asks ``copy=True`` and
    gets a private copy of the store in a fresh directory (its media stay the shared source's mp4s, referenced by
    absolute path: a test that changes media builds its own tree). Every reuse, and the end of the session, check
    that no file of a shared source or store changed, and fail naming them otherwise.
    ``sample_store.source(...)`` is the generated source root (Path), not prepared.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._sources: dict[tuple, Path] = {}
        self._stores: dict[tuple, str] = {}
        self._states: dict[tuple, dict[str, tuple[int, int]]] = {}

    @staticmethod
    def _key(videos=3, seconds=16.0, seed=2, defect_fraction=0.0, fps=30.0, size=(160, 120)) -> tuple:
        return int(videos), float(seconds), int(seed), float(defect_fraction), float(fps), tuple(int(v) for v in size)

    def source(self, **params) -> Path:
        """The generated Ego4D tree for ``params`` (see the class), shared: do not change it."""
        key = self._key(**params)
        if key not in self._sources:
            from mmloader.samples import generate_ego4d_sample

            videos, seconds, seed, defect_fraction, fps, size = key
            self._sources[key] = generate_ego4d_sample(
                self._tmp.mktemp("sample") / "ego4d", videos=videos, seconds=seconds, seed=seed,
                defect_fraction=defect_fraction, fps=fps, size=size, progress=False)
            self._states[key] = _tree_state(self._sources[key])
        self.check(key)
        return self._sources[key]

    def __call__(self, copy: bool = False, **params) -> str:
        key = self._key(**params)
        root = self.source(**params)
        if key not in self._stores:
            from mmloader.recipes.ego4d.recipe import Ego4DAdapter

            self._stores[key] = Ego4DAdapter().prepare(str(root), str(root.parent / "store"), progress=False)
            self._states[key] = _tree_state(root, Path(self._stores[key]))
        self.check(key)
        if not copy:
            return self._stores[key]
        dst = self._tmp.mktemp("store-copy") / "store"
        shutil.copytree(self._stores[key], dst)
        return str(dst)

    def check(self, key: tuple | None = None) -> None:
        """Fail when a file of a shared source or store (all of them when ``key`` is None) was changed."""
        for k in [key] if key is not None else list(self._states):
            roots = [self._sources[k]] + ([Path(self._stores[k])] if k in self._stores else [])
            now = _tree_state(*roots)
            if now != self._states[k]:
                changed = sorted(p for p in now.keys() | self._states[k].keys() if now.get(p) != self._states[k].get(p))
                pytest.fail(f"a test changed the shared sample store {roots[-1]} ({', '.join(changed[:5])}); "
                            f"a test that changes a store must use sample_store(..., copy=True)", pytrace=False)


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> SampleStores:
    """The session's sample-store factory: ``sample_store(videos=..., ..., copy=False) -> store path``."""
    stores = SampleStores(tmp_path_factory)
    yield stores
    stores.check()


@pytest.fixture(scope="module")
def s3_options():
    """An S3 API on loopback (moto's server mode, started here) with the bucket ``mmtest``; yields the storage
    options that reach it through s3fs (explicit: never the environment)."""
    import boto3
    from moto import server as moto_server  # in the dev extra: moto[server], s3fs

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="mmtest")
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
           "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 5, "read_timeout": 20}}
    server.stop()


@pytest.fixture(autouse=True)
def _no_launcher_environment(monkeypatch):
    """Tests start as one process of one: a CI job launched by torchrun or srun must not make the commands under test
    build only a part of what they build (tests that need ranks set them)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS",
                 "SLURM_LOCALID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a loopback server or a gloo rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (use with ``pytestmark = pytest.mark.usefixtures(...)``): on a shared
    2-core machine torch's 2 threads make the tiny GRU ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the tiny IMU2CLIP runs of the plugin's training tests ------------------------------------------------------------
TINY_ENCODER = dict(conv_channels=[16, 16], kernel_sizes=[5, 5], norm_groups=4, gru_hidden=16, gru_layers=1,
                    dropout=0.1)


def tiny_train_config(run_dir: Any, **kw: Any) -> Any:
    """A ``TrainConfig`` for a tiny, fast run into ``run_dir`` on 1-s windows of 32×32 frames (``TINY_ENCODER``,
    batch 8, CPU, no progress bar); ``kw`` overrides any field."""
    from imu2clip_plugin.train import TrainConfig

    base = dict(store="unused", sec=1, stride=0.5, size=(32, 32), batch_size=8, encoder=TINY_ENCODER, lr=3e-3,
                warmup_steps=2, run_dir=str(run_dir), progress=False)
    return TrainConfig(**{**base, **kw})


def process_alive(pid: int, start: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie, not dead) and, when given, still has the start time ``start`` (field 22
    of ``/proc/<pid>/stat``: no pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and (start is None or fields[19] == start)


def wait_gone(pids: list[int], seconds: float = 5.0) -> list[int]:
    """Wait up to ``seconds`` for ``pids`` to end; those still alive then."""
    deadline = time.monotonic() + seconds
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if process_alive(p)]


def kill_leftovers(pids: list[int]) -> None:
    """SIGCONT then SIGKILL to each of ``pids`` still there (a test's clean-up of workers it stopped)."""
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


# -- loader tests: batches compared bit for bit, and a set that logs and fails its reads -----------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: dict, want: dict, where: str = "") -> None:
    """``got`` is ``want`` bit for bit: key order, types, dtypes, shapes, values, list values."""
    assert list(got) == list(want), where
    for key, w in want.items():
        g = got[key]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor), (where, key, type(g))
            assert g.dtype == w.dtype and g.shape == w.shape, (where, key, g.dtype, w.dtype, g.shape, w.shape)
            assert torch.equal(bits(g), bits(w)), (where, key)
        else:
            assert type(g) is type(w) and g == w, (where, key)


def assert_batches(got: list[dict], want: list[dict], what: str = "") -> None:
    assert len(got) == len(want), (what, len(got), len(want))
    for k, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, f"{what} batch {k}")


class PartFailure(Exception):
    """An exception that pickles but does not unpickle (two constructor arguments)."""

    def __init__(self, window: int, why: str):
        super().__init__(f"window {window}: {why}")
        self.window = window


class Wrapped:
    """A set forwarding to ``ws`` (read_batch with rows/size, affinity); reading a window of ``bad`` (an int or a
    tuple of them) raises ``PartFailure``; ``log_dir``: each process logs the recordings it read (a line per read)."""

    def __init__(self, ws, bad: int | tuple | None = None, log_dir: Path | None = None):
        self.ws, self.log_dir = ws, log_dir
        self.bad = () if bad is None else (bad,) if isinstance(bad, int) else tuple(bad)

    def __len__(self) -> int:
        return len(self.ws)

    def _check(self, indices) -> None:
        hit = [int(i) for i in indices if int(i) in self.bad]
        if hit:
            raise PartFailure(hit[0], "unreadable on purpose")

    def __getitem__(self, i: int) -> dict:
        self._check([i])
        return self.ws[i]

    def affinity(self, indices):
        return self.ws.affinity(indices)

    def index_fields(self, i: int) -> dict:
        return self.ws.index_fields(i)

    def read_batch(self, indices, alloc=None, rows=None, size=None):
        self._check(indices)
        out = self.ws.read_batch(indices, alloc=alloc, rows=rows, size=size)
        if self.log_dir is not None:
            with open(self.log_dir / f"{os.getpid()}.log", "a") as f:
                f.write(f"{len(out['index'])} " + " ".join(sorted(set(out["recording_id"]))) + "\n")
        return out
