"""Training throughput (windows/s) with the embedding cache vs online frozen towers, same batch, same run.

    python benchmarks/train_step.py                       # tiny towers (random init), sample data
    python benchmarks/train_step.py --model ViT-B-32      # ViT-B-32 random init: the realistic tower cost
    python benchmarks/train_step.py --smoke               # seconds, on the CPU unless --device says otherwise

Both arms run the same IMU encoder training step (forward, InfoNCE against the video embedding, backward, AdamW)
on the same train windows and batch size. "online" reads the raw windows (decodes video) and runs the image tower
on every batch; "cached" reads IMU + ``video_emb`` from the embedding cache (built once before, timed separately).
Needs the plugin's extra (open_clip). Prints one JSON object with the keys: machine, model, device,
torch_threads, frame_size, frames, reduce, video_size, batch_size, steps, train_windows, cache_build_s, online,
cached, speedup.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from common import (Timer, add_sample_args, emit, machine, parse_args, parser, rate, sample_params, sample_store,
                    workdir)

SMOKE = dict(videos=4, seconds=10.0, video_size=[64, 48], video_fps=10.0, sec=1.0, stride=1.0, size=32, batch_size=4,
             steps=2, device="cpu")


def arguments(argv: list[str] | None):
    ap = parser(__doc__)
    ap.add_argument("--model", default="imu2clip-tiny")
    add_sample_args(ap, videos=4, seconds=30.0)
    ap.add_argument("--sec", type=float, default=2.0)
    ap.add_argument("--stride", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=224, help="decoded frame size (square)")
    ap.add_argument("--frames", type=int, default=1, help="frames per window (towers reduce them: --reduce)")
    ap.add_argument("--reduce", default="center", choices=["center", "mean"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm (after 1 warm-up step)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", default=None, help="directory for the sample data and caches, kept (default: a temp dir)")
    return parse_args(ap, SMOKE, argv)


class Arms:
    """The IMU encoder, loss and optimiser shared by both arms; ``run`` times ``args.steps`` steps of one arm."""

    def __init__(self, towers, args) -> None:
        from imu2clip_plugin import ContrastiveLoss, IMUEncoder, IMUEncoderConfig

        self.towers, self.args, self.device = towers, args, torch.device(args.device)
        torch.manual_seed(0)
        self.enc = IMUEncoder(IMUEncoderConfig(embed_dim=towers.embed_dim)).to(self.device)
        self.loss_fn = ContrastiveLoss().to(self.device)
        self.opt = torch.optim.AdamW([*self.enc.parameters(), *self.loss_fn.parameters()], lr=1e-4)

    def step(self, batch, online: bool) -> None:
        if online:
            z_v = self.towers.encode_frames(batch["video"].to(self.device), reduce=self.args.reduce)
        else:
            z_v = batch["video_emb"].to(self.device)
        imu = self.enc(batch["imu"].to(self.device), batch["imu_mask"].to(self.device), normalize=True)
        loss = self.loss_fn(imu, video=z_v)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def run(self, ws, online: bool) -> dict:
        """One warm-up step, then ``args.steps`` timed steps (epochs repeat as needed): windows/s."""
        loader = ws.loader(batch_size=self.args.batch_size, shuffle=True, seed=0, drop_last=True)
        n, t0, steps = 0, None, 0
        while steps <= self.args.steps:
            before = steps
            for batch in loader:
                self.step(batch, online)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if t0 is None:          # the first step is warm-up
                    t0 = time.perf_counter()
                else:
                    n += len(batch["index"])
                steps += 1
                if steps > self.args.steps:
                    break
            if steps == before:
                raise SystemExit(f"no full batch of {self.args.batch_size} in {len(ws)} train windows: "
                                 "lower --batch-size or generate more data")
        return rate(n, time.perf_counter() - t0, digits=4, rate_digits=2)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    import mmloader
    from imu2clip_plugin.embed import build_embedding_cache
    from imu2clip_plugin.towers import ClipTowers

    with workdir(args.work, prefix="imu2clip-bench-") as work:
        os.environ.setdefault("MMLOADER_CACHE_DIR", str(work / "mmcache"))
        store = sample_store(work, seed=0, defect_fraction=0.0, **sample_params(args))
        wins = mmloader.open(store).windows(sec=args.sec, stride=args.stride, modalities=["imu", "video"],
                                            frames=args.frames, size=(args.size, args.size))
        train_ws = wins.split("train")
        torch.manual_seed(0)
        towers = ClipTowers(args.model, device=torch.device(args.device))
        with Timer() as t:
            cached = build_embedding_cache(train_ws, towers, reduce=args.reduce)
        arms = Arms(towers, args)
        online = arms.run(train_ws, online=True)
        cache = arms.run(cached, online=False)
    emit({
        "machine": machine(), "model": args.model, "device": args.device, "torch_threads": torch.get_num_threads(),
        "frame_size": args.size, "frames": args.frames, "reduce": args.reduce, "video_size": args.video_size,
        "batch_size": args.batch_size, "steps": args.steps, "train_windows": len(train_ws),
        "cache_build_s": round(t.seconds, 3), "online": online, "cached": cache,
        "speedup": round(cache["windows_per_s"] / max(online["windows_per_s"], 1e-9), 2),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
