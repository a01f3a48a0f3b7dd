"""``imu2clip`` command line: ``imu2clip train --config FILE [--set key=value ...]``, ``imu2clip embed STORE ...`` and
``imu2clip evaluate ENCODER_DIR STORE [--splits val test] [--out DIR]``.

Configs are JSON (or TOML) files of :class:`imu2clip_plugin.train.TrainConfig` fields; ``--config imu_video`` (a bare
name) picks one of the packaged configs (``imu_video``, ``imu_text``, ``imu_video_text``). ``--set`` values are
parsed as JSON when they parse (``--set lr=1e-3 --set size=[112,112] --set pretrained=null``), else taken as strings;
``--set encoder.gru_hidden=128`` sets a nested key. ``--resume`` continues ``run_dir/checkpoint.pt`` (an error when
there is none); ``--resume auto`` continues it when there is one, else starts afresh; ``--overwrite`` starts over in
a run dir that already holds a checkpoint (without one of these, such a run dir is refused). The flags override the
config file's ``resume`` / ``overwrite``.

Expected errors are one line on stderr, exit status 1: a checkpoint that cannot be resumed (none there, corrupt,
truncated, not plain values, wrong contents; the message names the file and the field), a run dir already holding a
checkpoint, a config value or data that cannot train (too few windows for one batch, no recordings to hold out, a
store that cannot be opened). Anything else (a bug) keeps its traceback.

Each command is one ``cmd_<name>(args) -> exit status`` (:data:`COMMANDS`); ``embed`` and ``evaluate`` share the
tower options (:func:`add_tower_arguments`) and take mmloader's window options
(:func:`mmloader.cli.add_window_arguments`) with their own defaults.

``imu2clip index build ENCODER_DIR STORE --out INDEX`` and ``imu2clip search INDEX (--text T | --like REC:T |
--image FILE)`` build and search a motion index (``docs/search.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from mmloader.cli import add_rank_arguments, add_window_arguments, rank_arguments, window_kwargs

CONFIG_DIR = Path(__file__).with_name("configs")


def load_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{path}.json").exists():
        p = CONFIG_DIR / f"{path}.json"
    if p.suffix == ".toml":
        import tomllib

        return tomllib.loads(p.read_text())
    return json.loads(p.read_text())


def apply_overrides(d: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    for item in sets:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = d
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return d


def _resume_arg(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"expected 'auto' or nothing, got {value!r}")
    return value


# -- shared options --------------------------------------------------------------------------------------
def add_tower_arguments(p: argparse.ArgumentParser) -> None:
    """The frozen CLIP towers' options (``embed`` and ``evaluate``): ``--model``, ``--pretrained``,
    ``--checkpoint``, ``--reduce``."""
    p.add_argument("--model", default="imu2clip-tiny", help="open_clip architecture of the frozen CLIP towers")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default: random weights, "
                                                      "unless --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="a local weights file for the towers")
    p.add_argument("--reduce", default="center", choices=["center", "mean"],
                   help="a window's video embedding: its centre frame's, or the mean of its frames'")


def _towers(args: argparse.Namespace, device: str | None = None):
    """The ClipTowers the tower options describe (on ``device``, else ClipTowers' default)."""
    from .towers import ClipTowers

    kw = {"device": device} if device is not None else {}
    return ClipTowers(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **kw)


def _fail(cmd: str, e: BaseException) -> int:
    """An expected error: its message on one line of stderr, exit status 1."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"imu2clip {cmd}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 1


# -- commands --------------------------------------------------------------------------------------------
def _config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The config file with the ``--set`` overrides, then ``--resume`` / ``--overwrite`` on top."""
    d = apply_overrides(load_config(args.config), args.set)
    if args.resume is not None:
        d["resume"], d["overwrite"] = args.resume, False
    if args.overwrite:
        d["resume"], d["overwrite"] = False, True
    return d


def cmd_train(args: argparse.Namespace) -> int:
    """``imu2clip train``: resolve the config, train (every rank), print the result (rank 0)."""
    from mmloader.errors import MMLoaderError

    from .distributed import is_main, shutdown_distributed
    from .train import TrainConfig, TrainSetupError, train

    try:
        d = _config_dict(args)
    except (OSError, ValueError) as e:   # no such file, not JSON/TOML
        return _fail("train", e)
    try:
        cfg = TrainConfig.from_dict(d)
    except (ValueError, TypeError) as e:   # an unknown key or a bad value in the config file or a --set
        return _fail("train", e)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        out = train(cfg)
    except (TrainSetupError, MMLoaderError) as e:
        # expected: a checkpoint refused (naming the file), a run dir in use, a config or data that cannot train
        return _fail("train", e)
    out.pop("model", None)
    if is_main():
        print(json.dumps(out, indent=2, default=str))
    shutdown_distributed()
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """``imu2clip embed``: fill the embedding cache of a store's windows; prints its URL, fingerprint and size."""
    import mmloader
    import torch

    from .embed import build_embedding_cache

    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    towers = _towers(args, device=device)
    mods = ["imu", *(["video"] if "video" in args.targets else []), *(["text"] if "text" in args.targets else [])]
    kw = window_kwargs(args, modalities=mods)
    if "video" not in args.targets:
        kw.pop("size", None)   # frame options only describe windows with video
    rank, world = rank_arguments(args)
    wins = mmloader.open(args.store).windows(**kw)
    cached = build_embedding_cache(wins, towers, url=args.url, reduce=args.reduce, progress=True, rank=rank,
                                   world_size=world, shard_size=args.shard_size)
    c = cached.window_cache
    st = c.status(verify=False)
    print(json.dumps({"url": c.url, "fingerprint": c.fingerprint, "windows": len(cached), "rank": rank,
                      "world_size": world, "shards_complete": st["shards_complete"],
                      "shards_total": st["shards_total"]}, indent=2))
    return 0


def _held_out(args: argparse.Namespace):
    """``(windows, held_out, labels, label_map)``: the store's windows (labelled from ``--label-stream`` when the
    store has it and no ``--label-map`` is given), those of the held-out ``--splits``."""
    import mmloader

    ds = mmloader.open(args.store)
    label_map = json.loads(Path(args.label_map).read_text()) if args.label_map else None
    labels = args.label_stream if args.label_stream in ds.modalities and label_map is None else None
    wins = ds.windows(**window_kwargs(args, stride=args.stride if args.stride else args.sec / 2,
                                      modalities=["imu", "video", "text"], label_stream=labels))
    splits = wins.index["split"].to_pylist()
    held_out = wins.filter([s in args.splits for s in splits])
    if len(held_out) == 0:
        raise SystemExit(f"{args.store}: no windows in the splits {args.splits} (the store has {sorted(set(splits))})")
    return wins, held_out, labels, label_map


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``imu2clip evaluate``: retrieval and activity recognition of a trained encoder; prints the tables and
    writes the report."""
    import torch

    from .encoder import IMUEncoder, load_encoder
    from .evaluate import evaluate_encoder, format_results

    torch.manual_seed(args.seed)
    towers = _towers(args)
    encoder = load_encoder(args.encoder)
    if encoder.config.embed_dim != towers.embed_dim:
        raise SystemExit(f"{args.encoder}: the encoder embeds into {encoder.config.embed_dim} dimensions but "
                         f"{args.model} has {towers.embed_dim}: evaluate with the towers it was trained against")
    wins, held_out, labels, label_map = _held_out(args)
    torch.manual_seed(args.seed + 1)
    baseline = IMUEncoder(encoder.config)
    out = args.out or str(Path(args.encoder).resolve().parent / "report")
    res = evaluate_encoder(encoder, wins.split(args.train_split) if labels or label_map else None, held_out, towers,
                           baseline_encoder=baseline, fine_tune_epochs=args.fine_tune_epochs, reduce=args.reduce,
                           run_dir=out, label_map=label_map)
    print(format_results(res))
    print(f"report: {res['report']}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """``imu2clip index build``: embed a store's windows into a motion index (``motion_index.build_index``); prints
    what this run embedded and reused, and whether the manifest was written. Under torchrun (``WORLD_SIZE > 1``
    and no ``--rank``) the process group is joined first, so rank 0 writes the manifest after a barrier."""
    import os

    from mmloader.errors import MMLoaderError

    from .motion_index import build_index

    device = args.device
    if args.rank is None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "MASTER_ADDR" in os.environ:
        from .distributed import init_distributed

        device = str(init_distributed(args.device or "auto")[2])
    kw = window_kwargs(args, modalities=["video"])
    kw.pop("modalities")
    split = kw.pop("split", None)
    towers = {"model": args.model, "pretrained": args.pretrained, "checkpoint": args.checkpoint, "seed": args.seed,
              "reduce": args.reduce}
    try:
        out = build_index(args.encoder, args.store, args.out, split=split, recordings=args.recording,
                          targets=args.targets, label_stream=args.label_stream, towers=towers, rank=args.rank,
                          world_size=args.world_size, batch_size=args.batch_size, device=device,
                          progress=not args.quiet, **kw)
    except (MMLoaderError, ValueError, FileNotFoundError) as e:
        return _fail("index build", e)
    print(json.dumps(out, indent=2))
    if not out["complete"]:
        print(f"imu2clip index build: rank {out['rank']} of {out['world_size']} is done; {len(out['missing'])} "
              "part(s) of other ranks are not there yet: the run that finds every part writes the manifest (or run "
              "the same command once more with --rank 0 --world-size 1 to finalise)", file=sys.stderr)
    return 0


def _search_output(args: argparse.Namespace, index, moments, extra: dict[str, Any]) -> None:
    """Print the moments: a table (default) or one JSON object (``--json``)."""
    from .search import format_moments

    query = {"text": args.text} if args.text is not None else {"like": args.like} if args.like is not None \
        else {"image": args.image}
    method = "faiss" if args.faiss else "exact"
    if args.json:
        print(json.dumps({"index": index.url, "query": query, "k": args.k, "method": method, "windows": len(index),
                          "moments": [m.to_dict() for m in moments], **extra}, indent=2))
        return
    what = ", ".join(f"{k} {v!r}" for k, v in query.items())
    print(f"query: {what}; {method} search over {len(index)} windows; {len(moments)} moment(s)")
    print(format_moments(moments))
    if "faiss" in extra:
        f = extra["faiss"]
        print(f"faiss: {f['kind']} nlist={f['nlist']} nprobe={f['nprobe']}: recall@{f['k']} against exact search "
              f"{f['recall_at_k']:.3f} on {f['queries']} queries from the index")
    if "sheet" in extra:
        print(f"contact sheet: {extra['sheet']['png']} {extra['sheet']['html']}")


def cmd_search(args: argparse.Namespace) -> int:
    """``imu2clip search``: the best moments of a motion index for a text, a moment (``--like``) or an image."""
    from mmloader.errors import MMLoaderError

    from .motion_index import MotionIndex

    try:
        index = MotionIndex.open(args.index, device=args.device or "cpu")
        moments = index.search(text=args.text, like=args.like, image=args.image, k=args.k, split=args.split,
                               recordings=args.recording, faiss=args.faiss)
        extra: dict[str, Any] = {}
        if args.faiss:
            from .search import faiss_recall

            extra["faiss"] = faiss_recall(index)
        if args.sheet and moments:
            from .contact_sheet import write_contact_sheet

            png, page = write_contact_sheet(index, moments, args.sheet, store=args.store, frames=args.sheet_frames,
                                            title=f"imu2clip search: {args.text or args.like or args.image}")
            extra["sheet"] = {"png": png, "html": page}
    except (MMLoaderError, ValueError, ImportError, FileNotFoundError) as e:
        return _fail("search", e)
    _search_output(args, index, moments, extra)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "embed": cmd_embed, "evaluate": cmd_evaluate, "index": cmd_index, "search": cmd_search}


# -- the parser ------------------------------------------------------------------------------------------
def _add_index_parser(sub: Any) -> None:
    """``imu2clip index build ENCODER_DIR STORE --out INDEX ...``."""
    ix = sub.add_parser("index", help="motion indexes: a store's windows embedded by a trained encoder")
    b = ix.add_subparsers(dest="index_cmd", required=True).add_parser(
        "build", help="embed every window of a store (or a split) into a motion index (incremental, by recording)")
    b.add_argument("encoder", help="directory written by save_encoder (run_dir/encoder)")
    add_window_arguments(b, ("store", "sec", "stride", "anchor", "imu_hz", "frames", "size", "split", "backend"),
                         defaults={"frames": 1, "size": [64, 64]},
                         help={"stride": "seconds between window starts (default: sec / 2)"})
    b.add_argument("--out", required=True, help="the index: a folder or any fsspec URL (s3://...)")
    b.add_argument("--recording", nargs="+", default=None, metavar="ID", help="index only these recordings")
    b.add_argument("--targets", nargs="*", default=None, choices=["video", "text"],
                   help="what the towers embed beside the IMU (default: video and text where the store has them)")
    b.add_argument("--label-stream", default="activities", help="event stream labelling the windows (if present)")
    for flag, hlp in (("--model", "open_clip architecture"), ("--pretrained", "open_clip pretrained tag"),
                      ("--checkpoint", "a local weights file for the towers")):
        b.add_argument(flag, default=None, help=f"{hlp} of the towers (default: the training run's config.json "
                                                "beside ENCODER_DIR, else imu2clip-tiny with random weights)")
    b.add_argument("--reduce", default=None, choices=["center", "mean"], help="a window's video embedding: its "
                   "centre frame's or the mean of its frames' (default: the run's config, else center)")
    b.add_argument("--seed", type=int, default=None, help="seeds random-init towers (default: the run's, else 0)")
    add_rank_arguments(b, "embeds only its contiguous part of the recordings")
    b.add_argument("--batch-size", type=int, default=64, help="windows per encoder / tower call")
    b.add_argument("--device", default=None, help="where to embed (default: cuda when available, else cpu)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_search_parser(sub: Any) -> None:
    """``imu2clip search INDEX (--text T | --like REC:T | --image FILE) ...``."""
    s = sub.add_parser("search", help="the moments of a motion index that best match a text, a moment or an image")
    s.add_argument("index", help="a motion index (imu2clip index build --out)")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", default=None, help="text → IMU: windows whose motion matches the text")
    q.add_argument("--like", default=None, metavar="REC_ID:T_SEC", help="IMU → IMU: windows moving like the window "
                   "of REC_ID containing T_SEC (that window comes first)")
    q.add_argument("--image", default=None, metavar="FILE", help="image → IMU: windows whose motion matches the image")
    s.add_argument("-k", type=int, default=10, help="number of moments (merged windows) to return")
    s.add_argument("--split", nargs="+", default=None, help="search only these splits")
    s.add_argument("--recording", nargs="+", default=None, metavar="ID", help="search only these recordings")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--sheet", default=None, metavar="OUT_PREFIX",
                   help="write a contact sheet: OUT_PREFIX.png and OUT_PREFIX.html (frames and IMU trace per hit)")
    s.add_argument("--sheet-frames", type=int, default=4, help="frames per hit on the contact sheet")
    s.add_argument("--store", default=None, help="read the sheet's frames from this store (default: the index's)")
    s.add_argument("--faiss", action="store_true", help="approximate search with FAISS (IVF, built on first use and "
                   "cached beside the index); prints its recall@10 against exact search")
    s.add_argument("--device", default=None, help="where the towers embed the query (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imu2clip", description="IMU2CLIP training on mmloader")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train an IMU encoder")
    t.add_argument("--config", required=True, help="JSON/TOML file, or a packaged name (imu_video, imu_text, imu_video_text)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const=True, default=None, type=_resume_arg, metavar="auto",
                       help="continue run_dir/checkpoint.pt (an error if there is none); '--resume auto': continue it "
                            "if there is one, else start afresh")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in a run_dir that already holds a checkpoint, replacing it and metrics.jsonl "
                            "(without --resume or --overwrite such a run_dir is refused)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    e = sub.add_parser("embed", help="build the embedding cache of a store's windows")
    add_window_arguments(e, ("store", "sec", "stride", "anchor", "frames", "size"),
                         defaults={"stride": 1.0, "frames": 1, "size": [64, 64]},
                         help={"stride": "seconds between window starts"})
    e.add_argument("--targets", nargs="+", default=["video"], choices=["video", "text"],
                   help="what to embed: the windows' video, their text, or both")
    add_window_arguments(e, ("split",))
    add_tower_arguments(e)
    e.add_argument("--url", default="auto", help="where to write the cache (default: the cache dir, by fingerprint)")
    e.add_argument("--seed", type=int, default=0, help="seeds random-init towers")
    e.add_argument("--device", default=None, help="where the towers run (default: cuda when available, else cpu)")
    e.add_argument("--shard-size", type=int, default=None, help="windows per cache shard (default: the cache's)")
    add_rank_arguments(e, "embeds only its contiguous part of the cache's shards")

    v = sub.add_parser("evaluate", help="retrieval and activity recognition of a trained encoder on held-out recordings")
    v.add_argument("encoder", help="directory written by save_encoder (run_dir/encoder)")
    v.add_argument("--out", default=None, help="report directory (default: ENCODER/../report)")
    add_window_arguments(v, ("store", "sec", "stride", "frames", "size"),
                         defaults={"frames": 1, "size": [64, 64]},
                         help={"stride": "seconds between window starts (default: sec / 2)"})
    v.add_argument("--splits", nargs="+", default=["val", "test"], help="held-out splits (queries and candidates)")
    v.add_argument("--train-split", default="train", help="split the probes and fine-tuning train on")
    v.add_argument("--label-stream", default="activities", help="event stream with the class labels (if present)")
    v.add_argument("--label-map", default=None, metavar="JSON",
                   help='label windows from their narrations instead: a JSON file {"verb": "class", ...} '
                        '(e.g. {"walk": "walking", "cut": "cooking"}); windows naming no mapped verb are left out')
    add_tower_arguments(v)
    v.add_argument("--fine-tune-epochs", type=int, default=15)
    v.add_argument("--seed", type=int, default=0, help="seeds random-init towers and the baseline encoder")
    _add_index_parser(sub)
    _add_search_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
