"""HTTP requests per window when the store lives on S3. Prints JSON.

    python benchmarks/remote_requests.py [--videos 4 --seconds 30 --sec 5] [--smoke]

Starts moto's S3 server on loopback, prepares the sample store into it, and counts the requests the server
receives while opening the store, building IMU windows, and reading every window once (num_workers=0).
Media files stay local here (the Ego4D recipe references them); the count is for the store itself.
Needs the dev extra (moto[server], boto3, s3fs).

Output keys: machine, windows, requests (prepare, open, build_windows, read_all_windows, read_again),
requests_per_window_first_read, requests_per_window_second_read.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter

import boto3
from moto.server import ThreadedMotoServer

import mmloader
from common import add_sample_args, emit, machine, parse_args, parser, sample_params, sample_source, workdir
from mmloader.recipes.ego4d.recipe import Ego4DAdapter

SMOKE = dict(videos=2, seconds=10.0, video_size=[64, 48], video_fps=10.0, sec=1.0)


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


def s3_server() -> tuple[ThreadedMotoServer, dict]:
    """A started moto S3 server on a free loopback port with bucket ``bench``, and its ``storage_options``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    return server, opts


def count_requests(src: str, opts: dict, sec: float, counter: _Count) -> tuple[int, dict]:
    """Prepare ``src`` onto S3, open it, build IMU windows, read them all twice: the requests of each step."""
    counter.take()
    url = Ego4DAdapter().prepare(src, "s3://bench/store", progress=False, storage_options=opts)
    steps = {"prepare": counter.take()}
    ds = mmloader.open(url, storage_options=opts)
    steps["open"] = counter.take()
    ws = ds.windows(sec=sec, modalities=["imu"])
    steps["build_windows"] = counter.take()
    for name in ("read_all_windows", "read_again"):
        for i in range(len(ws)):
            ws[i]
        steps[name] = counter.take()
    return len(ws), steps


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    add_sample_args(p, videos=4, seconds=30.0)
    p.add_argument("--sec", type=float, default=5.0)
    args = parse_args(p, SMOKE, argv)
    server, opts = s3_server()
    counter = _Count()
    logging.getLogger("werkzeug").addHandler(counter)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    try:
        with workdir() as work:
            n, requests = count_requests(str(sample_source(work, **sample_params(args))), opts, args.sec, counter)
    finally:
        server.stop()
    emit({
        "machine": machine(),
        "windows": n,
        "requests": requests,
        "requests_per_window_first_read": round(sum(requests["read_all_windows"].values()) / max(n, 1), 3),
        "requests_per_window_second_read": round(sum(requests["read_again"].values()) / max(n, 1), 3),
    })


if __name__ == "__main__":
    main()
