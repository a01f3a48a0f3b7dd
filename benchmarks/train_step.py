"""Training throughput (windows/s) with the embedding cache vs online frozen towers, same batch, same run.

    python benchmarks/train_step.py                       # tiny towers (random init), sample data
    python benchmarks/train_step.py --model ViT-B-32      # ViT-B-32 random init: the realistic tower cost

Both arms run the same IMU encoder training step (forward, InfoNCE against the video embedding, backward, AdamW)
on the same train windows and batch size. "online" reads the raw windows (decodes video) and runs the image tower
on every batch; "cached" reads IMU + ``video_emb`` from the embedding cache (built once before, timed separately).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="imu2clip-tiny")
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--sec", type=float, default=2.0)
    ap.add_argument("--stride", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=224, help="decoded frame size (square)")
    ap.add_argument("--frames", type=int, default=1, help="frames per window (towers reduce them: --reduce)")
    ap.add_argument("--reduce", default="center", choices=["center", "mean"])
    ap.add_argument("--video-size", type=int, nargs=2, default=[160, 120], help="generated videos' W H")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm (after 1 warm-up step)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default=None, help="directory for the sample data and caches (default: a temp dir)")
    args = ap.parse_args(argv)

    import os

    import mmloader
    from mmloader.recipes.ego4d.recipe import Ego4DAdapter
    from mmloader.samples import generate_ego4d_sample

    from imu2clip_plugin import ContrastiveLoss, IMUEncoder, IMUEncoderConfig
    from imu2clip_plugin.embed import build_embedding_cache
    from imu2clip_plugin.towers import ClipTowers

    work = Path(args.work or tempfile.mkdtemp(prefix="imu2clip-bench-"))
    os.environ.setdefault("MMLOADER_CACHE_DIR", str(work / "mmcache"))
    root = work / f"ego4d-{args.videos}x{args.seconds:g}-{args.video_size[0]}x{args.video_size[1]}"
    if not root.exists():
        generate_ego4d_sample(root, videos=args.videos, seconds=args.seconds, seed=0, defect_fraction=0.0,
                              size=tuple(args.video_size), progress=False)
    store = work / (root.name + "-store")
    if not store.exists():
        Ego4DAdapter().prepare(str(root), str(store), progress=False)
    wins = mmloader.open(str(store)).windows(sec=args.sec, stride=args.stride, modalities=["imu", "video"], frames=args.frames,
                                             size=(args.size, args.size))
    train_ws = wins.split("train")
    device = torch.device(args.device)
    torch.manual_seed(0)
    towers = ClipTowers(args.model, device=device)
    t = time.perf_counter()
    cached = build_embedding_cache(train_ws, towers, reduce=args.reduce)
    build_s = time.perf_counter() - t

    torch.manual_seed(0)
    enc = IMUEncoder(IMUEncoderConfig(embed_dim=towers.embed_dim)).to(device)
    loss_fn = ContrastiveLoss().to(device)
    opt = torch.optim.AdamW([*enc.parameters(), *loss_fn.parameters()], lr=1e-4)

    def step(batch, online: bool) -> None:
        if online:
            z_v = towers.encode_frames(batch["video"].to(device), reduce=args.reduce)
        else:
            z_v = batch["video_emb"].to(device)
        loss = loss_fn(enc(batch["imu"].to(device), batch["imu_mask"].to(device), normalize=True), video=z_v)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run(ws, online: bool) -> dict:
        loader = ws.loader(batch_size=args.batch_size, shuffle=True, seed=0, drop_last=True)
        n, t0, steps = 0, None, 0
        while steps <= args.steps:
            for batch in loader:
                step(batch, online)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if t0 is None:          # the first step is warm-up
                    t0 = time.perf_counter()
                else:
                    n += len(batch["index"])
                steps += 1
                if steps > args.steps:
                    break
        dt = time.perf_counter() - t0
        return {"windows": n, "seconds": round(dt, 4), "windows_per_s": round(n / dt, 2)}

    online = run(train_ws, online=True)
    cache = run(cached, online=False)
    out = {
        "model": args.model, "device": str(device), "torch_threads": torch.get_num_threads(),
        "frame_size": args.size, "frames": args.frames, "reduce": args.reduce, "video_size": args.video_size, "batch_size": args.batch_size, "steps": args.steps,
        "train_windows": len(train_ws), "cache_build_s": round(build_s, 3),
        "online": online, "cached": cache,
        "speedup": round(cache["windows_per_s"] / online["windows_per_s"], 2),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
