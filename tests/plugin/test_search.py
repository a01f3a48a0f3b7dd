"""Search over a motion index: moments merged from windows, --like finds its own window first, text search finds
the queried activity more often than chance (trained encoder), FAISS against exact search, the contact sheet."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

pytest.importorskip("open_clip")

from imu2clip_plugin import IMUEncoder, IMUEncoderConfig, save_encoder  # noqa: E402
from imu2clip_plugin.cli import main  # noqa: E402
from imu2clip_plugin.motion_index import MotionIndex, build_index  # noqa: E402
from imu2clip_plugin.search import (FaissIVF, exact_topk, merge_moments, parse_like, recall_at_k,  # noqa: E402
                                    search)

NS = 1_000_000_000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def index_url(sample_store, tmp_path_factory):
    """An index of a small sample store by an untrained encoder: the mechanics (read-only, shared)."""
    root = tmp_path_factory.mktemp("search")
    torch.manual_seed(0)
    enc = IMUEncoder(IMUEncoderConfig(conv_channels=(8, 16), kernel_sizes=(5, 5), norm_groups=4, gru_hidden=16,
                                      gru_layers=1, embed_dim=64, dropout=0.0))
    store = sample_store(videos=3, seconds=16, seed=2, defect_fraction=0.0)
    build_index(str(save_encoder(enc, root / "enc")), store, root / "idx", sec=2.0, frames=1, size=(32, 32))
    return str(root / "idx")


@pytest.fixture(scope="module")
def index(index_url):
    return MotionIndex.open(index_url)


# -- merging --------------------------------------------------------------------------------------------
def _fake(windows):
    """A stand-in index: ``windows`` = [(recording, t0_s, t1_s)]."""
    return SimpleNamespace(recording_ids=np.array([w[0] for w in windows], dtype=object),
                           t0_ns=np.array([int(w[1] * NS) for w in windows]),
                           t1_ns=np.array([int(w[2] * NS) for w in windows]),
                           table=pa.table({"split": ["train"] * len(windows), "text": [None] * len(windows),
                                           "label": [None] * len(windows)}))


def test_overlapping_and_touching_windows_merge_into_one_moment():
    ix = _fake([("a", 0, 2), ("a", 1, 3), ("a", 3, 5), ("a", 6, 8), ("b", 1, 3), ("a", 8, 10), ("a", 20, 22)])
    # by score: a0-2, b1-3, a6-8, a1-3 (overlaps a0-2), a3-5 (touches it), a8-10 (touches a6-8), a20-22
    rows, scores = [0, 4, 3, 1, 2, 5, 6], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    moments, stopped = merge_moments(ix, rows, scores, k=3)
    assert stopped   # a20-22 would start a 4th moment
    assert [(m.recording_id, m.t0, m.t1, m.score, m.windows) for m in moments] == [
        ("a", 0.0, 5.0, 0.9, (0, 1, 2)), ("b", 1.0, 3.0, 0.8, (4,)), ("a", 6.0, 10.0, 0.7, (3, 5))]
    # a window bridging two moments of its recording merges them (span = union, score = the best)
    ix = _fake([("a", 0, 2), ("a", 4, 6), ("a", 2, 4)])
    moments, stopped = merge_moments(ix, [0, 1, 2], [0.9, 0.8, 0.1], k=2)
    assert not stopped and [(m.t0, m.t1, m.score, sorted(m.windows)) for m in moments] == [(0.0, 6.0, 0.9, [0, 1, 2])]


def test_parse_like():
    assert parse_like("rec:with:colons:12.5") == ("rec:with:colons", 12.5)
    assert parse_like(("r", 3)) == ("r", 3.0)
    for bad in ("nocolon", ":3", "r:x"):
        with pytest.raises(ValueError, match="REC_ID:T_SEC"):
            parse_like(bad)


# -- queries --------------------------------------------------------------------------------------------
def test_like_returns_its_own_window_first(index, index_url, capsys):
    for row in (0, 7, len(index) // 2, len(index) - 1):
        rid, t0 = index.recording_ids[row], index.t0_ns[row] / NS
        assert index.window_at(rid, t0 + 0.01) == row          # t0 + 0.01 is also in the window before: nearest start
        moments = index.search(like=f"{rid}:{t0 + 0.01}", k=5)
        assert 1 <= len(moments) <= 5 and moments[0].best == row and row in moments[0].windows
        assert moments[0].recording_id == rid and moments[0].t0 <= t0 < moments[0].t1
        assert moments[0].score == pytest.approx(1.0, abs=1e-5)
        assert [m.score for m in moments] == sorted((m.score for m in moments), reverse=True)
    assert main(["search", index_url, "--like", f"{rid}:{t0 + 0.01}", "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["moments"][0]["best"] == row and len(out["moments"]) <= 3 and out["method"] == "exact"


def test_scores_are_cosines_and_filters_apply(index, index_url, capsys):
    q = "The person runs on the track"
    moments = index.search(text=q, k=4)
    z = index.towers.encode_text([q])[0].numpy()
    for m in moments:
        assert m.score == pytest.approx(float(index.vectors("imu")[m.best] @ z), abs=1e-5)
        for w in m.windows:   # every window merged into a moment lies in its span, on its recording
            assert index.recording_ids[w] == m.recording_id and m.t0 <= index.t0_ns[w] / NS < m.t1
    split = index.table["split"][0].as_py()
    assert {m.split for m in index.search(text=q, k=4, split=split)} == {split}
    rid = index.recording_ids[-1]
    assert {m.recording_id for m in index.search(text=q, k=3, recordings=[rid])} == {rid}
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    image[:, :25] = 200
    z = index.towers.encode_images(torch.as_tensor(image).permute(2, 0, 1)[None])[0].numpy()
    best = index.search(image=image, k=1)[0]
    assert best.score == pytest.approx(float(np.max(index.vectors("imu") @ z)), abs=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        index.search(text=q, like=f"{rid}:1")
    with pytest.raises(ValueError, match="no window"):
        index.search(like="no-such-recording:1")
    assert main(["search", index_url, "--text", q, "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "query: text" in table and "recording" in table and len(table.strip().splitlines()) == 4
    assert main(["search", index_url, "--like", "nope:1"]) == 1
    assert "imu2clip search: error:" in capsys.readouterr().err


# -- FAISS ----------------------------------------------------------------------------------------------
def test_faiss_recall_against_exact_search_on_random_vectors():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((100, 512)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    fi = FaissIVF.build(x)
    recall = recall_at_k(fi.search(q, 10)[1], exact_topk(x, q, 10))
    assert recall >= 0.95, (recall, fi.info())
    ids = np.arange(0, len(x), 3)                         # a filter: only these rows may come back
    got = fi.search(q[:5], 10, ids=ids)[1]
    assert np.all(np.isin(got, ids))


def test_faiss_search_cli_caches_the_index_and_prints_its_recall(index, index_url, capsys, monkeypatch):
    pytest.importorskip("faiss")
    rid, t0 = index.recording_ids[5], index.t0_ns[5] / NS
    assert main(["search", index_url, "--like", f"{rid}:{t0}", "-k", "3", "--faiss"]) == 0
    out = capsys.readouterr().out
    assert "recall@10 against exact search" in out and "faiss search" in out
    cached = [p.suffix for p in (Path(index_url) / "faiss").iterdir()]   # the index and its record, beside it
    assert sorted(cached) == [".faiss", ".json"]

    def no_build(*a, **k):
        raise AssertionError("the cached FAISS index was not used")

    monkeypatch.setattr(FaissIVF, "build", classmethod(no_build))
    fresh = MotionIndex.open(index_url)
    exact = fresh.search(like=(rid, t0), k=3)
    approx = fresh.search(like=(rid, t0), k=3, faiss=True)
    assert approx[0].best == exact[0].best == 5


def test_faiss_not_installed_is_a_clear_error(index_url, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)
    fresh = MotionIndex.open(index_url)
    with pytest.raises(ImportError, match="faiss-cpu"):
        search(fresh, text="anything", faiss=True)
    assert main(["search", index_url, "--text", "anything", "--faiss"]) == 1
    assert "pip install faiss-cpu" in capsys.readouterr().err


# -- the contact sheet ----------------------------------------------------------------------------------
def test_contact_sheet_png_and_html(index_url, tmp_path, capsys):
    from PIL import Image

    from imu2clip_plugin.contact_sheet import SHEET_DPI, sheet_inches

    prefix = tmp_path / "sheet"
    assert main(["search", index_url, "--text", "The person climbs the stairs", "-k", "3", "--json",
                 "--sheet", str(prefix), "--sheet-frames", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    moments = out["moments"]
    assert len(moments) == 3 and out["sheet"]["png"] == f"{prefix}.png"
    with Image.open(f"{prefix}.png") as im:
        im.load()
        w, h = sheet_inches(3, 3)                                     # 3 moments: 3 rows of a trace and 3 frames
        assert im.size == (round(w * SHEET_DPI), round(h * SHEET_DPI)) and im.size[1] > 3 * 100
        assert np.asarray(im.convert("L")).std() > 10                 # not a blank page
    page = (tmp_path / "sheet.html").read_text()
    assert page.startswith("<!doctype html>") and page.count('<div class="hit"') == 3
    assert page.count("data:image/png;base64,") == 3 * (3 + 1)    # 3 frames and an IMU trace per hit
    for m in moments:
        assert m["recording_id"] in page and f"t = {m['t0']:.2f}–{m['t1']:.2f} s" in page


# -- the must-show: text search on a trained encoder finds the queried activity ----------------------------
QUERIES = {   # one narration phrasing of each activity of the sample (its narrations, as the recipe writes them)
    "walking": "The person walks along the corridor", "running": "The person runs on the track",
    "sitting down": "The person sits on the chair", "standing up": "The person stands up from the chair",
    "looking around": "The person looks around the room", "cycling": "The person rides the bicycle on the road",
    "climbing stairs": "The person climbs the stairs"}


def _match_rates(index_url, labels, capsys, split=None):
    """(rate, chance): the share of returned moments whose best window has the queried activity, and the share
    of the searched windows that have it (what a random pick would score), over all activities."""
    hits = total = chance = 0.0
    splits = np.asarray(MotionIndex.open(index_url).table["split"].to_pylist(), dtype=object)
    searched = np.isin(splits, split) if split else np.ones(len(labels), bool)
    for activity, text in QUERIES.items():
        if not np.any(labels[searched] == activity):
            continue
        assert main(["search", index_url, "--text", text, "-k", "10", "--json",
                     *(["--split", *split] if split else [])]) == 0
        moments = json.loads(capsys.readouterr().out)["moments"]
        hits += sum(labels[m["best"]] == activity for m in moments)
        total += len(moments)
        chance += len(moments) * float(np.mean(labels[searched] == activity))
    return hits / total, chance / total


def test_text_search_finds_the_activity_more_often_than_chance(sample_store, tmp_path, monkeypatch, capsys):
    from imu2clip_plugin.train import TrainConfig, train

    monkeypatch.setenv("MMLOADER_CACHE_DIR", str(tmp_path / "mmcache"))
    # 24 short recordings: ~8 activity segments per activity, so 10 moments of one activity can exist at all
    store = sample_store(videos=24, seconds=20, seed=5, defect_fraction=0.0, fps=10, size=(64, 48))
    encoder = dict(conv_channels=[16, 32], kernel_sizes=[5, 5], norm_groups=4, gru_hidden=32, gru_layers=1,
                   dropout=0.0)
    # imu_text: the IMU encoder learns the (random-init, tiny) text tower's embeddings of the narrations
    out = train(TrainConfig(store=store, sec=2, stride=0.5, targets=("text",), size=None, batch_size=16, epochs=12,
                            lr=3e-3, warmup_steps=5, encoder=encoder, run_dir=str(tmp_path / "run"), progress=False,
                            device="cpu"))
    idx = str(tmp_path / "idx")
    assert main(["index", "build", out["encoder_dir"], store, "--out", idx, "--sec", "2", "--size", "32", "32",
                 "--quiet"]) == 0
    capsys.readouterr()
    labels = np.asarray(MotionIndex.open(idx).table["label"].to_pylist(), dtype=object)
    rate, chance = _match_rates(idx, labels, capsys)
    held_rate, held_chance = _match_rates(idx, labels, capsys, split=["val", "test"])   # never trained on
    print(f"activity match rate {rate:.3f} (chance {chance:.3f}); held-out recordings {held_rate:.3f} "
          f"(chance {held_chance:.3f})")
    assert rate >= 2 * chance, (rate, chance)
    assert held_rate > held_chance + 0.1, (held_rate, held_chance)
