"""Contact sheets of search results: ``PREFIX.png`` (one row per moment: its IMU trace and a few of its frames) and
``PREFIX.html`` (a page a person opens in a browser: per moment the recording id, ``t0–t1``, the score, the label and
narration, the frames and the IMU trace, embedded as ``data:`` URIs so the page is one self-contained file).

The frames and the IMU come from the store, read through mmloader's windows (its own video decoding and IMU
resampling): for each moment, its best window, re-cut with the index's window spec and ``frames`` frames at the
centres of ``frames`` equal parts of the window. Before reading, each recording's content in the store is checked
against the fingerprint the index recorded for it (the store changed since the build: MotionIndexError).
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from mmloader.fsutil import get_fs, normalize_url

if TYPE_CHECKING:
    from .motion_index import MotionIndex
    from .search import Moment

__all__ = ["write_contact_sheet", "hit_samples", "sheet_inches", "SHEET_DPI"]

SHEET_DPI = 100
ROW_INCHES = 1.6          # height of one moment's row in the PNG
TRACE_INCHES = 3.2        # width of the IMU trace column
FRAME_INCHES = 1.4        # width of one frame column
TITLE_INCHES = 0.7        # the title band


def _window_sets(index: "MotionIndex", ds: Any, rids: list[str], frames: int, size: tuple[int, int]) -> list[Any]:
    """Window sets to read the hits from, in order of preference: with video (when the store has it), then the
    index's own modalities (a set whose tile grid is the index's)."""
    spec = index.manifest["windows"]["spec"]
    kw = {k: spec[k] for k in ("sec", "stride", "anchor", "imu_hz", "text_stream", "max_masked_fraction",
                               "video_backend") if k in spec}
    sets = []
    if "video" in ds.modalities:
        sets.append(ds.windows(**kw, modalities=["imu", "video"], frames=frames, size=tuple(size)).recordings(rids))
    if "video" not in spec["modalities"]:
        sets.append(ds.windows(**kw, modalities=["imu"]).recordings(rids))
    return sets


def hit_samples(index: "MotionIndex", moments: Sequence["Moment"], store: str | None = None, frames: int = 4,
                size: tuple[int, int] = (96, 128)) -> list[dict[str, Any]]:
    """Each moment's best window read from the store: ``{"t0": its start (s, recording clock), "imu": (C, T)
    float32, "video": (F, H, W, 3) uint8 or None, "video_t": (F,) frame times (s, recording clock) or None}``.
    ``store``: default the URL the index recorded."""
    import mmloader

    from .motion_index import MotionIndexError, recording_fingerprints

    ds = mmloader.open(store or index.manifest["store"]["url"])
    rids = sorted({m.recording_id for m in moments})
    recorded = {e["recording_id"]: e.get("recording_fingerprint") for e in index.manifest["parts"]}
    missing = [r for r in rids if r not in set(ds.recording_ids)]
    if missing:
        raise MotionIndexError(f"{ds.url}: recordings {missing[:3]} of the hits are not in this store")
    for rid, fp in recording_fingerprints(ds.store, rids).items():
        if fp != recorded.get(rid):
            raise MotionIndexError(f"{ds.url}: recording {rid!r} changed since the index {index.url} was built (field "
                                   "'recording_fingerprint' differs): rebuild the index")
    sets = _window_sets(index, ds, rids, frames, size)
    lookups = [dict(zip(zip(ws.index["recording_id"].to_pylist(), ws.index["t0_ns"].to_pylist()), range(len(ws))))
               for ws in sets]
    out = []
    for m in moments:
        key = (m.recording_id, int(index.t0_ns[m.best]))
        for ws, lookup in zip(sets, lookups):
            if key in lookup:
                s = ws[lookup[key]]
                video = s.get("video")
                out.append({"t0": key[1] / 1e9, "imu": s["imu"].numpy(),
                            "video": None if video is None else video.permute(0, 2, 3, 1).numpy(),
                            "video_t": None if video is None else key[1] / 1e9 + s["video_t"].numpy()})
                break
        else:
            raise MotionIndexError(f"{ds.url}: window {key[0]!r} at t0={key[1] / 1e9:g} s is not cut by the "
                                   "index's window spec in this store: rebuild the index")
    return out


def sheet_inches(n_moments: int, n_frames: int) -> tuple[float, float]:
    """The contact sheet's (width, height) in inches (× ``SHEET_DPI`` for pixels): a row per moment, the IMU
    trace then ``n_frames`` frames, and a title band."""
    return TRACE_INCHES + FRAME_INCHES * n_frames, ROW_INCHES * n_moments + TITLE_INCHES


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=SHEET_DPI)
    return buf.getvalue()


def _sheet_png(moments: Sequence["Moment"], samples: list[dict[str, Any]], frames: int, title: str) -> bytes:
    """The contact sheet: a row per moment, its IMU trace then its frames."""
    from .report import _plot_imu_trace, _pyplot

    plt = _pyplot()
    n_frames = max([0 if s["video"] is None else len(s["video"]) for s in samples] + [0])
    cols = 1 + n_frames
    fig, axes = plt.subplots(len(moments), cols, squeeze=False,
                             figsize=sheet_inches(len(moments), n_frames),
                             gridspec_kw={"width_ratios": [TRACE_INCHES] + [FRAME_INCHES] * n_frames})
    for i, (m, s, row) in enumerate(zip(moments, samples, axes)):
        _plot_imu_trace(row[0], s["imu"])
        row[0].set_title(f"#{i + 1} {m.recording_id[:13]} {m.t0:.2f}-{m.t1:.2f} s  cos {m.score:.3f}", fontsize=7)
        for j, a in enumerate(row[1:]):
            a.set_xticks([])
            a.set_yticks([])
            if s["video"] is not None and j < len(s["video"]):
                a.imshow(s["video"][j])
                a.set_title(f"{float(s['video_t'][j]):.2f} s", fontsize=6)
            else:
                a.axis("off")
    fig.suptitle(f"{title}\n(IMU and frames of each moment's best window; frame times on the recording clock)",
                 fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _frame_png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(buf, format="PNG")
    return buf.getvalue()


def _trace_png(imu: np.ndarray) -> bytes:
    from .report import _plot_imu_trace, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.0, 1.6))
    _plot_imu_trace(ax, imu)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


_STYLE = ("body{font-family:sans-serif;margin:1.5em;color:#222}.hit{border-top:1px solid #ccc;padding:.6em 0}"
          ".hit h2{font-size:1.05em;margin:.2em 0}.meta{color:#555;font-size:.9em}.frames img{height:120px;"
          "margin-right:4px;border:1px solid #aaa}img.imu{height:150px;display:block;margin-top:4px}")


def _hit_html(i: int, m: "Moment", s: dict[str, Any]) -> str:
    esc = html.escape
    imgs = "" if s["video"] is None else "".join(
        f'<img src="{_data_uri(_frame_png(f))}" alt="frame at {float(t):.2f} s" title="{float(t):.2f} s">'
        for f, t in zip(s["video"], s["video_t"]))
    return (f'<div class="hit" id="hit-{i}"><h2>#{i} {esc(m.recording_id)}</h2>'
            f'<p class="meta">t = {m.t0:.2f}–{m.t1:.2f} s · score {m.score:.4f} · split {esc(str(m.split))} · '
            f'label {esc(str(m.label))} · {len(m.windows)} window(s); frames and IMU of the best window, '
            f'{s["t0"]:.2f} s</p>'
            f'<p class="text">{esc(m.text or "")}</p><div class="frames">{imgs}</div>'
            f'<img class="imu" src="{_data_uri(_trace_png(s["imu"]))}" alt="IMU trace"></div>')


def _sheet_html(moments: Sequence["Moment"], samples: list[dict[str, Any]], title: str, png_name: str,
                index_url: str) -> str:
    esc = html.escape
    hits = "\n".join(_hit_html(i, m, s) for i, (m, s) in enumerate(zip(moments, samples), 1))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n"
            f'<p class="meta">{len(moments)} moment(s) from the index {esc(index_url)}; contact sheet: '
            f'<a href="{esc(png_name)}">{esc(png_name)}</a>. IMU traces: channels 0-2 solid (left axis), 3-5 '
            f"dashed (right axis).</p>\n{hits}\n</body></html>\n")


def write_contact_sheet(index: "MotionIndex", moments: Sequence["Moment"], prefix: str | os.PathLike, *,
                        store: str | None = None, frames: int = 4, size: tuple[int, int] = (96, 128),
                        title: str | None = None) -> tuple[str, str]:
    """Write ``PREFIX.png`` and ``PREFIX.html`` (module docstring), atomically; returns their URLs. ``size``:
    (H, W) of the frames; ``store``: where to read them (default: the store the index was built from)."""
    from .motion_index import _put

    if not moments:
        raise ValueError("no moments to draw: the search returned nothing")
    samples = hit_samples(index, moments, store=store, frames=frames, size=size)
    title = title or "imu2clip search"
    base = normalize_url(prefix)
    png_url, html_url = f"{base}.png", f"{base}.html"
    fs, png_path = get_fs(png_url)
    _put(fs, png_path, _sheet_png(moments, samples, frames, title))
    fs, html_path = get_fs(html_url)
    _put(fs, html_path, _sheet_html(moments, samples, title, os.path.basename(png_url), index.url).encode())
    return png_url, html_url
