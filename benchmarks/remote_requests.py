"""HTTP requests per window when the store lives on S3. Prints JSON.

    python benchmarks/remote_requests.py [--videos 4 --seconds 30 --sec 5]

Starts moto's S3 server on loopback, prepares the sample store into it, and counts the requests the server
receives while opening the store, building IMU windows, and reading every window once (num_workers=0).
Media files stay local here (the Ego4D recipe references them); the count is for the store itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import tempfile
from collections import Counter

import boto3
from moto.server import ThreadedMotoServer

import mmloader
from mmloader.recipes.ego4d.recipe import Ego4DAdapter
from mmloader.samples import generate_ego4d_sample


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.methods: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        for m in ("GET", "HEAD", "PUT", "POST", "DELETE"):
            if f'"{m} ' in msg:
                self.methods[m] += 1

    def take(self) -> dict[str, int]:
        out = dict(self.methods)
        self.methods.clear()
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--sec", type=float, default=5.0)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    counter = _Count()
    logging.getLogger("werkzeug").addHandler(counter)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id="k",
                 aws_secret_access_key="s", region_name="us-east-1").create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = generate_ego4d_sample(f"{tmp}/ego4d", videos=args.videos, seconds=args.seconds, progress=False)
            counter.take()
            url = Ego4DAdapter().prepare(str(src), "s3://bench/store", progress=False, storage_options=opts)
            prepare = counter.take()
            ds = mmloader.open(url, storage_options=opts)
            opened = counter.take()
            ws = ds.windows(sec=args.sec, modalities=["imu"])
            built = counter.take()
            for i in range(len(ws)):
                ws[i]
            read = counter.take()
            for i in range(len(ws)):
                ws[i]
            again = counter.take()
    finally:
        server.stop()
    n = len(ws)
    print(json.dumps({
        "windows": n,
        "requests": {"prepare": prepare, "open": opened, "build_windows": built, "read_all_windows": read,
                     "read_again": again},
        "requests_per_window_first_read": round(sum(read.values()) / n, 3),
        "requests_per_window_second_read": round(sum(again.values()) / n, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
