"""`bench_load.py CKPT --model s3://BUCKET/PREFIX`: loading from an object store, in one run.

CKPT (a local directory) is uploaded to BUCKET/PREFIX of a local S3-compatible server
(`tests/s3server.py`: moto's S3 app on 127.0.0.1, started and stopped here, logging every
GET with the requesting rank), then each system runs in a fresh torchrun of `--nproc` CPU
ranks, `--repeats` times, interleaved:

* distload-s3:   `distload.load("s3://...")`: each rank ranged-GETs its own byte ranges;
* download-all:  every rank `boto3` `download_file`s every file of the checkpoint into its
                 own directory, then `distload.load`s that copy (what users do today);
* node-download: the node's first rank downloads every file once, the others wait, then
                 every rank `distload.load`s the node's copy.

Per system: the slowest rank's seconds (median), and per rank the bytes the server sent
it (its log: independent of distload's counters) and the bytes it wrote to disk.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("distload-s3", "download-all", "node-download")
MB = 1e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(tmp: Path) -> tuple[subprocess.Popen, dict, Path]:
    port, log = _free_port(), tmp / "s3log.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "s3server.py"), str(port), str(tmp / "ctl.json"),
                             str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, env, log
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the local S3 server did not start")


def _sent_per_rank(log: Path, since: int) -> dict[int, int]:
    per: dict[int, int] = {}
    with open(log) as f:
        lines = f.readlines()[since:]
    for r in map(json.loads, lines):
        if r.get("rank") is not None and r.get("status") in (200, 206):
            per[r["rank"]] = per.get(r["rank"], 0) + r["bytes"]
    return per


def s3_main(a) -> int:
    import boto3

    bucket, _, prefix = a.model[len("s3://"):].partition("/")
    files = sorted(p for p in Path(a.ckpt).iterdir() if p.is_file())
    tensor_bytes = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        proc, env, log = _server(Path(tmp))
        try:
            client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                  aws_access_key_id="testing", aws_secret_access_key="testing")
            client.create_bucket(Bucket=bucket)
            for p in files:
                client.upload_file(str(p), bucket, f"{prefix}/{p.name}" if prefix else p.name)
            print(f"checkpoint {a.ckpt}: {len(files)} files, {tensor_bytes / MB:.1f} MB of safetensors, "
                  f"uploaded to {a.model} on {env['AWS_ENDPOINT_URL']}; {a.nproc} ranks, {a.repeats} repeat(s)",
                  flush=True)
            runs: dict[str, list[list[dict]]] = {s: [] for s in SYSTEMS}
            for rep in range(a.repeats):
                for system in SYSTEMS:
                    out = Path(tmp) / f"{system}-{rep}"
                    out.mkdir()
                    since = len(log.read_text().splitlines()) if log.exists() else 0
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={a.nproc}", str(ROOT / "scripts" / "_bench_s3_worker.py"),
                           system, a.model, str(out)]
                    done = subprocess.run(cmd, env={**os.environ, **env, "OMP_NUM_THREADS": "1",
                                                    "PYTHONPATH": str(ROOT)},
                                          capture_output=True, text=True, timeout=a.timeout)
                    if done.returncode != 0:
                        print(done.stderr[-3000:], file=sys.stderr)
                        return 1
                    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(a.nproc)]
                    sent = _sent_per_rank(log, since)
                    for r in ranks:
                        r["sent"] = sent.get(r["rank"], 0)
                    runs[system].append(ranks)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
    rows = []
    print(f"\n{'system':<14} {'load s (slowest rank, median)':>30} " +
          " ".join(f"{f'rank {r} MB got / written':>24}" for r in range(a.nproc)) + f" {'sum got / files':>18}")
    for system, reps in runs.items():
        secs = statistics.median(max(r["seconds"] for r in rep) for rep in reps)
        last = reps[-1]
        got = sum(r["sent"] for r in last)
        cells = " ".join(f"{r['sent'] / MB:>12.1f} / {r['written'] / MB:>9.1f}" for r in last)
        print(f"{system:<14} {secs:>30.3f} {cells} {got / tensor_bytes:>17.2f}x")
        rows.append({"system": system, "seconds": secs, "ranks": last})
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "nproc": a.nproc, "tensor_file_bytes": tensor_bytes,
                                      "rows": rows, "runs": runs}, indent=1))
    return 0
