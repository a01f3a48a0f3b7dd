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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
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
    e.add_argument("store")
    e.add_argument("--sec", type=float, default=5.0)
    e.add_argument("--stride", type=float, default=1.0)
    e.add_argument("--anchor", default="tile")
    e.add_argument("--frames", type=int, default=1)
    e.add_argument("--size", type=int, nargs=2, default=[64, 64])
    e.add_argument("--targets", nargs="+", default=["video"], choices=["video", "text"])
    e.add_argument("--split", default=None)
    e.add_argument("--model", default="imu2clip-tiny")
    e.add_argument("--pretrained", default=None)
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--reduce", default="center", choices=["center", "mean"])
    e.add_argument("--url", default="auto")
    e.add_argument("--seed", type=int, default=0, help="seeds random-init towers")
    e.add_argument("--device", default=None, help="where the towers run (default: cuda when available, else cpu)")
    v = sub.add_parser("evaluate", help="retrieval and activity recognition of a trained encoder on held-out recordings")
    v.add_argument("encoder", help="directory written by save_encoder (run_dir/encoder)")
    v.add_argument("store")
    v.add_argument("--out", default=None, help="report directory (default: ENCODER/../report)")
    v.add_argument("--sec", type=float, default=5.0)
    v.add_argument("--stride", type=float, default=None, help="default: sec / 2")
    v.add_argument("--frames", type=int, default=1)
    v.add_argument("--size", type=int, nargs=2, default=[64, 64])
    v.add_argument("--splits", nargs="+", default=["val", "test"], help="held-out splits (queries and candidates)")
    v.add_argument("--train-split", default="train", help="split the probes and fine-tuning train on")
    v.add_argument("--label-stream", default="activities", help="event stream with the class labels (if present)")
    v.add_argument("--label-map", default=None, metavar="JSON",
                   help='label windows from their narrations instead: a JSON file {"verb": "class", ...} '
                        '(e.g. {"walk": "walking", "cut": "cooking"}); windows naming no mapped verb are left out')
    v.add_argument("--model", default="imu2clip-tiny")
    v.add_argument("--pretrained", default=None)
    v.add_argument("--checkpoint", default=None)
    v.add_argument("--reduce", default="center", choices=["center", "mean"])
    v.add_argument("--fine-tune-epochs", type=int, default=15)
    v.add_argument("--seed", type=int, default=0, help="seeds random-init towers and the baseline encoder")
    args = ap.parse_args(argv)

    if args.cmd == "evaluate":
        return _evaluate(args)

    if args.cmd == "train":
        from mmloader.errors import MMLoaderError

        from .train import TrainConfig, TrainSetupError, train

        def fail(e: BaseException) -> int:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"imu2clip train: error: {' '.join(str(msg).split())}", file=sys.stderr)
            return 1

        try:
            d = apply_overrides(load_config(args.config), args.set)
        except (OSError, ValueError) as e:   # no such file, not JSON/TOML
            return fail(e)
        if args.resume is not None:
            d["resume"], d["overwrite"] = args.resume, False
        if args.overwrite:
            d["resume"], d["overwrite"] = False, True
        try:
            cfg = TrainConfig.from_dict(d)
        except (ValueError, TypeError) as e:   # an unknown key or a bad value in the config file or a --set
            return fail(e)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        try:
            out = train(cfg)
        except (TrainSetupError, MMLoaderError) as e:
            # expected: a checkpoint refused (naming the file), a run dir in use, a config or data that cannot train
            return fail(e)
        out.pop("model", None)
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            print(json.dumps(out, indent=2, default=str))
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return 0

    import mmloader
    import torch

    from .embed import build_embedding_cache
    from .towers import ClipTowers

    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    towers = ClipTowers(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, device=device)
    mods = ["imu", *(["video"] if "video" in args.targets else []), *(["text"] if "text" in args.targets else [])]
    kw = {"frames": args.frames, "size": tuple(args.size)} if "video" in args.targets else {}
    wins = mmloader.open(args.store).windows(sec=args.sec, stride=args.stride, modalities=mods, anchor=args.anchor,
                                             split=args.split, **kw)
    cached = build_embedding_cache(wins, towers, url=args.url, reduce=args.reduce, progress=True)
    c = cached.window_cache
    print(json.dumps({"url": c.url, "fingerprint": c.fingerprint, "windows": len(cached)}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import mmloader
    import torch

    from .encoder import IMUEncoder, load_encoder
    from .evaluate import evaluate_encoder, format_results
    from .towers import ClipTowers

    torch.manual_seed(args.seed)
    towers = ClipTowers(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    encoder = load_encoder(args.encoder)
    if encoder.config.embed_dim != towers.embed_dim:
        raise SystemExit(f"{args.encoder}: the encoder embeds into {encoder.config.embed_dim} dimensions but "
                         f"{args.model} has {towers.embed_dim}: evaluate with the towers it was trained against")
    ds = mmloader.open(args.store)
    label_map = json.loads(Path(args.label_map).read_text()) if args.label_map else None
    labels = args.label_stream if args.label_stream in ds.modalities and label_map is None else None
    wins = ds.windows(sec=args.sec, stride=args.stride if args.stride else args.sec / 2,
                      modalities=["imu", "video", "text"], frames=args.frames, size=tuple(args.size), label_stream=labels)
    splits = wins.index["split"].to_pylist()
    held_out = wins.filter([s in args.splits for s in splits])
    if len(held_out) == 0:
        raise SystemExit(f"{args.store}: no windows in the splits {args.splits} (the store has {sorted(set(splits))})")
    torch.manual_seed(args.seed + 1)
    baseline = IMUEncoder(encoder.config)
    out = args.out or str(Path(args.encoder).resolve().parent / "report")
    res = evaluate_encoder(encoder, wins.split(args.train_split) if labels or label_map else None, held_out, towers,
                           baseline_encoder=baseline, fine_tune_epochs=args.fine_tune_epochs, reduce=args.reduce,
                           run_dir=out, label_map=label_map)
    print(format_results(res))
    print(f"report: {res['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
