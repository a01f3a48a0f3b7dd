"""The motion index: one row per window with its vectors, checked on open, incremental by recording, spread over
ranks (sequential --rank runs, and a real gloo group) with vectors bit-identical to a one-process build, atomic."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import mmloader

pytest.importorskip("open_clip")

from imu2clip_plugin import IMUEncoder, IMUEncoderConfig, load_encoder, save_encoder  # noqa: E402
from imu2clip_plugin import motion_index as mi  # noqa: E402
from imu2clip_plugin.cli import main  # noqa: E402
from imu2clip_plugin.evaluate import embed_windows  # noqa: E402
from imu2clip_plugin.motion_index import (MANIFEST_NAME, MotionIndex, MotionIndexError, TowerSpec,  # noqa: E402
                                          build_index, encoder_fingerprint)
from imu2clip_plugin.text import text_of  # noqa: E402

WIN = dict(sec=2.0, frames=1, size=(32, 32))          # stride: sec / 2 = 1 s
WIN_ARGS = ["--sec", "2", "--frames", "1", "--size", "32", "32", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(sample_store):
    return sample_store(videos=3, seconds=16, seed=2, defect_fraction=0.0)


def _encoder_dir(root: Path, seed: int) -> str:
    torch.manual_seed(seed)
    enc = IMUEncoder(IMUEncoderConfig(conv_channels=(8, 16), kernel_sizes=(5, 5), norm_groups=4, gru_hidden=16,
                                      gru_layers=1, embed_dim=64, dropout=0.0))
    return str(save_encoder(enc, root / f"enc{seed}"))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return _encoder_dir(tmp_path_factory.mktemp("encoder"), 0)


@pytest.fixture(scope="module")
def built(store, encoder_dir, tmp_path_factory):
    """A one-process build of the whole store (shared, read-only)."""
    out = tmp_path_factory.mktemp("index") / "idx"
    res = build_index(encoder_dir, store, out, **WIN)
    return out, res


def test_one_row_per_window_with_its_vectors_and_a_checked_manifest(built, store, encoder_dir):
    out, res = built
    ds = mmloader.open(store)
    wins = ds.windows(sec=2, stride=1, modalities=["imu", "video"], frames=1, size=(32, 32))
    assert res["complete"] and res["embedded"] == res["recordings"] == 2 and res["windows"] == len(wins)
    index = MotionIndex.open(out)
    assert len(index) == len(wins) and index.dim == 64
    rids = wins.index["recording_id"].to_pylist()
    order = sorted(range(len(wins)), key=lambda i: rids[i])        # parts by recording id, windows in index order
    assert index.table["recording_id"].to_pylist() == [rids[i] for i in order]
    assert index.t0_ns.tolist() == [wins.index["t0_ns"][i].as_py() for i in order]
    # text: the window's narrations as embedded in training; label from the activities stream
    texted = ds.windows(sec=2, stride=1, modalities=["imu", "video", "text"], frames=1, size=(32, 32))
    want = dict(zip(texted.index["t0_ns"].to_pylist(), (text_of(t) for t in texted.index["text"].to_pylist())))
    got = dict(zip(index.t0_ns.tolist(), index.table["text"].to_pylist()))
    assert {t: v for t, v in got.items() if v is not None} == want and None in got.values()
    assert set(index.table["label"].to_pylist()) <= set(mmloader.samples.ACTIVITIES)
    # the IMU vectors are the encoder's (as evaluate embeds them), unit length
    enc = load_encoder(encoder_dir)
    ref = embed_windows(enc, wins)
    np.testing.assert_allclose(index.vectors("imu"), ref.imu[order], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(index.vectors("video"), axis=1), 1, atol=1e-5)
    has_text = np.array([t is not None for t in index.table["text"].to_pylist()])
    assert np.all(index.vectors("text")[~has_text] == 0)
    np.testing.assert_allclose(np.linalg.norm(index.vectors("text")[has_text], axis=1), 1, atol=1e-5)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["format_version"] == mi.INDEX_FORMAT_VERSION and m["vectors"] == ["imu", "video", "text"]
    assert m["encoder"]["fingerprint"] == encoder_fingerprint(enc)
    assert m["windows"]["spec"]["sec"] == 2.0 and m["windows"]["spec"]["stride"] == 1.0
    assert m["store"]["url"] == ds.url and m["store"]["generation"] == ds.store.manifest["generation"]
    assert m["towers"]["model"] == "imu2clip-tiny" and m["towers"]["fingerprint"]
    for e in m["parts"]:
        data = (out / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["size"]


def test_rebuild_embeds_only_new_recordings(store, encoder_dir, tmp_path, built):
    rids = sorted(mmloader.open(store).recordings_with("imu"))
    first = build_index(encoder_dir, store, tmp_path / "idx", recordings=rids[:1], **WIN)
    assert (first["embedded"], first["reused"], first["recordings"]) == (1, 0, 1)
    assert MotionIndex.open(tmp_path / "idx").recording_ids.tolist() == [rids[0]] * first["windows"]
    grown = build_index(encoder_dir, store, tmp_path / "idx", **WIN)       # "new recordings": the rest of the store
    assert (grown["embedded"], grown["reused"], grown["recordings"]) == (1, 1, 2)
    again = build_index(encoder_dir, store, tmp_path / "idx", **WIN)
    assert (again["embedded"], again["reused"]) == (0, 2)
    a, b = MotionIndex.open(tmp_path / "idx", vectors=("imu", "video", "text")), MotionIndex.open(built[0])
    assert a.table.equals(b.table)
    for v in ("imu", "video", "text"):
        assert np.array_equal(a.vectors(v), b.vectors(v)), v
    # another encoder (or window spec) is another index: every part embedded again
    other = build_index(_encoder_dir(tmp_path, 1), store, tmp_path / "idx", **WIN)
    assert (other["embedded"], other["reused"]) == (2, 0)
    assert not np.array_equal(MotionIndex.open(tmp_path / "idx").vectors("imu"), b.vectors("imu"))


def test_ranks_then_finalise_are_bit_identical_to_one_process(store, encoder_dir, tmp_path, built, capsys):
    out = str(tmp_path / "ranked")
    args = ["index", "build", encoder_dir, store, "--out", out, *WIN_ARGS]
    assert main([*args, "--rank", "0", "--world-size", "2"]) == 0
    r0 = json.loads(capsys.readouterr().out)
    assert (r0["embedded"], r0["complete"], len(r0["missing"])) == (1, False, 1)
    assert not (tmp_path / "ranked" / MANIFEST_NAME).exists()     # not an index until every part is there
    assert main([*args, "--rank", "1", "--world-size", "2"]) == 0
    r1 = json.loads(capsys.readouterr().out)
    assert (r1["embedded"], r1["complete"]) == (1, True)          # this run found every part: it wrote the manifest
    assert main([*args, "--world-size", "1", "--rank", "0"]) == 0  # the documented finalise: reuses every part
    fin = json.loads(capsys.readouterr().out)
    assert (fin["embedded"], fin["reused"], fin["complete"]) == (0, 2, True)
    a = MotionIndex.open(out, vectors=("imu", "video", "text"))
    b = MotionIndex.open(built[0], vectors=("imu", "video", "text"))
    assert a.table.equals(b.table)
    for v in ("imu", "video", "text"):
        assert np.array_equal(a.vectors(v), b.vectors(v)), v
    assert [e["sha256"] for e in a.manifest["parts"]] == [e["sha256"] for e in b.manifest["parts"]]


def _gloo_worker(rank, world, port, encoder_dir, store, out, cache_dir):
    import os

    os.environ.update(MMLOADER_CACHE_DIR=cache_dir)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = build_index(encoder_dir, store, out, device="cpu", **WIN)
        assert res["rank"] == rank and res["world_size"] == world and res["embedded"] == 1 and res["complete"]
        assert os.path.exists(os.path.join(out, MANIFEST_NAME))   # rank 0 wrote it before the last barrier
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # ~20 s: two spawned processes each import torch, open_clip and the video backends
def test_a_gloo_group_writes_the_manifest_on_rank_0(store, encoder_dir, tmp_path, built):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "gloo")
    mp.spawn(_gloo_worker, args=(2, port, encoder_dir, store, out, str(tmp_path / "mmcache")), nprocs=2, join=True)
    a, b = MotionIndex.open(out), MotionIndex.open(built[0])
    assert np.array_equal(a.vectors("imu"), b.vectors("imu")) and a.table.equals(b.table)


def test_open_names_the_file_and_field_of_a_damaged_index(built, tmp_path):
    src = built[0]
    with pytest.raises(MotionIndexError, match=f"{MANIFEST_NAME}: not found"):
        MotionIndex.open(tmp_path / "nothing")

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst, json.loads((dst / MANIFEST_NAME).read_text())

    d, m = copy("flipped")
    part = d / m["parts"][0]["file"]
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    part.write_bytes(bytes(raw))
    with pytest.raises(MotionIndexError, match=rf"{part.name}: field 'sha256'"):
        MotionIndex.open(d)
    d, m = copy("truncated")
    part = d / m["parts"][1]["file"]
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(MotionIndexError, match=rf"{part.name}: field 'size'"):
        MotionIndex.open(d)
    d, m = copy("missing")
    (d / m["parts"][0]["file"]).unlink()
    with pytest.raises(MotionIndexError, match=rf"{m['parts'][0]['key']}\.parquet: part of recording .* is missing"):
        MotionIndex.open(d)
    d, m = copy("version")
    (d / MANIFEST_NAME).write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(MotionIndexError, match=rf"{MANIFEST_NAME}: field 'format_version' is 99"):
        MotionIndex.open(d)
    d, m = copy("rows")
    m["parts"][0]["rows"] += 1
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(MotionIndexError, match=r"field 'rows'"):
        MotionIndex.open(d)


def test_a_crashed_build_leaves_no_index_and_a_crashed_rebuild_the_old_one(store, encoder_dir, tmp_path,
                                                                           monkeypatch):
    real, calls = mi._embed_recording, []

    def crash_on_second(b, rid, meta):
        calls.append(rid)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(b, rid, meta)

    monkeypatch.setattr(mi, "_embed_recording", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(encoder_dir, store, tmp_path / "idx", **WIN)
    with pytest.raises(MotionIndexError, match="not found"):
        MotionIndex.open(tmp_path / "idx")
    monkeypatch.setattr(mi, "_embed_recording", real)
    res = build_index(encoder_dir, store, tmp_path / "idx", **WIN)       # the finished part is kept
    assert (res["embedded"], res["reused"]) == (1, 1)
    before = MotionIndex.open(tmp_path / "idx").manifest
    calls.clear()
    monkeypatch.setattr(mi, "_embed_recording", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):                   # a rebuild with another encoder dies
        build_index(_encoder_dir(tmp_path, 1), store, tmp_path / "idx", **WIN)
    assert MotionIndex.open(tmp_path / "idx").manifest == before        # the previous index is still whole


def test_an_index_on_an_fsspec_url_and_the_run_config_towers(store, tmp_path):
    import fsspec

    run = tmp_path / "run"
    enc = _encoder_dir(run, 3)
    Path(enc).rename(run / "encoder")
    (run / "config.json").write_text(json.dumps({"model_name": "imu2clip-tiny", "pretrained": None, "seed": 7,
                                                 "reduce": "mean"}))
    assert TowerSpec.resolve({"reduce": None}, run / "encoder") == TowerSpec(seed=7, reduce="mean")
    url = "memory://imu2clip-test/idx"
    try:
        res = build_index(str(run / "encoder"), store, url, targets=["text"], **WIN)
        assert res["complete"]
        index = MotionIndex.open(url)
        assert index.manifest["towers"]["seed"] == 7 and index.manifest["vectors"] == ["imu", "text"]
        assert index.search(like=(index.recording_ids[3], index.t0_ns[3] / 1e9), k=2)[0].best == 3
    finally:
        fsspec.filesystem("memory").rm("/imu2clip-test", recursive=True)
