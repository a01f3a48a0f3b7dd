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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "embed": cmd_embed, "evaluate": cmd_evaluate}


# -- the parser ------------------------------------------------------------------------------------------
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
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
