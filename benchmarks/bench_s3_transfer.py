"""S3 file transfer benchmark: streamed multipart (``S3Store.put_file``/``get_file``) against the
whole-object path it replaced (read the file into memory, one PutObject; GetObject into memory,
write), on a local moto S3 server. Prints seconds and this process's peak memory above its
baseline for each. Usage::

    python -m benchmarks.bench_s3_transfer [--mb 512]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import psutil
from botocore.exceptions import EndpointConnectionError

from benchmarks.bench_scaling import PeakRss
from llmrec_tasks.storage.store import S3Store

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_moto(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **CREDENTIALS},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", **_client_kwargs())
    for _ in range(300):
        try:
            client.list_buckets()
            return proc
        except EndpointConnectionError:  # not listening yet
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _client_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    """Seconds and peak RSS above the baseline (MB) of one call."""
    baseline = psutil.Process().memory_info().rss
    started = time.perf_counter()
    with PeakRss() as rss:
        fn()
    return time.perf_counter() - started, (rss.peak - baseline) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="file size in MiB")
    parser.add_argument("--port", type=int, default=5123)
    args = parser.parse_args()
    proc = start_moto(args.port)
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{args.port}", **_client_kwargs())
        client.create_bucket(Bucket="bench")
        store = S3Store("bench", "p", client=client)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "artifact.bin"
            with source.open("wb") as fh:
                for _ in range(args.mb):
                    fh.write(os.urandom(2**20))
            back = Path(tmp) / "back.bin"

            def whole_put() -> None:
                client.put_object(Bucket="bench", Key="p/whole.bin", Body=source.read_bytes())

            def whole_get() -> None:
                back.write_bytes(client.get_object(Bucket="bench", Key="p/whole.bin")["Body"].read())

            rows = {
                "upload, streamed multipart (put_file)": measure(
                    lambda: store.put_file("streamed.bin", source)
                ),
                "upload, whole object in memory (before)": measure(whole_put),
                "download, streamed (get_file)": measure(lambda: store.get_file("streamed.bin", back)),
                "download, whole object in memory (before)": measure(whole_get),
            }
    finally:
        proc.terminate()
        proc.wait()
    print(f"\n## S3 file transfer, {args.mb} MiB, local moto server")
    print("| method | seconds | peak RSS above baseline MB |")
    print("| --- | ---: | ---: |")
    for name, (seconds, peak) in rows.items():
        print(f"| {name} | {seconds:.1f} | {peak:.0f} |")
    for what in ("upload", "download"):
        (s_new, m_new), (s_old, m_old) = (v for k, v in rows.items() if k.startswith(what))
        print(f"{what}: memory {m_old / max(m_new, 1):.1f}x less streamed, time {s_old / s_new:.2f}x")


if __name__ == "__main__":
    main()
