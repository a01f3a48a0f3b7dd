"""``imu2clip`` command line: ``imu2clip train --config FILE [--set key=value ...]`` and ``imu2clip embed STORE ...``.

Configs are JSON (or TOML) files of :class:`imu2clip_plugin.train.TrainConfig` fields; ``--config imu_video`` (a bare
name) picks one of the packaged configs (``imu_video``, ``imu_text``, ``imu_video_text``). ``--set`` values are
parsed as JSON when they parse (``--set lr=1e-3 --set size=[112,112] --set pretrained=null``), else taken as strings;
``--set encoder.gru_hidden=128`` sets a nested key.
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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="imu2clip", description="IMU2CLIP training on mmloader")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train an IMU encoder")
    t.add_argument("--config", required=True, help="JSON/TOML file, or a packaged name (imu_video, imu_text, imu_video_text)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    t.add_argument("--resume", action="store_true", help="resume from run_dir/checkpoint.pt")
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
    args = ap.parse_args(argv)

    if args.cmd == "train":
        from .train import TrainConfig, train

        d = apply_overrides(load_config(args.config), args.set)
        if args.resume:
            d["resume"] = True
        cfg = TrainConfig.from_dict(d)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        out = train(cfg)
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
    towers = ClipTowers(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    mods = ["imu", *(["video"] if "video" in args.targets else []), *(["text"] if "text" in args.targets else [])]
    kw = {"frames": args.frames, "size": tuple(args.size)} if "video" in args.targets else {}
    wins = mmloader.open(args.store).windows(sec=args.sec, stride=args.stride, modalities=mods, anchor=args.anchor,
                                             split=args.split, **kw)
    cached = build_embedding_cache(wins, towers, url=args.url, reduce=args.reduce, progress=True)
    c = cached.window_cache
    print(json.dumps({"url": c.url, "fingerprint": c.fingerprint, "windows": len(cached)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
