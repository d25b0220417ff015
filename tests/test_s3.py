"""The object-store source (`distload.sources.s3`) against a local S3-compatible server:
moto's S3 app behind a small fault layer (`tests/s3server.py`), started on 127.0.0.1 by
a fixture and stopped by its pid. References come from safetensors' reader and
transformers on the original files, and from the server's own log of what it sent.

Checked: 2 ranks and 2 simulated nodes load bit-exact, each rank fetching exactly its
tensor bytes (headers aside, on rank 0); the disk tier goes to the node's offload store;
a cast through bounded staging; `load_checkpoint_and_dispatch` from s3://;
faults — a missing object, HTTP 500 then success, 500 forever, a truncated body, an object
replaced after the plan, bad credentials — each stop the load with one line naming the
object.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import distload
from distload.errors import CheckpointError
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config
from .mp import torchrun, torchrun_nodes, worker

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

BUCKET = "models"
LAST = "model-00003-of-00003.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, root: Path) -> None:
        self.port, self.root = _free_port(), root
        self.control, self.log = root / "control.json", root / "log.jsonl"
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("s3server.py")), str(self.port),
                                      str(self.control), str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_REGION": "us-east-1",
                    "AWS_MAX_ATTEMPTS": "3"}
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the S3 test server did not start")
                time.sleep(0.1)
        self.client().create_bucket(Bucket=BUCKET)

    def client(self):
        return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                     region_name="us-east-1").client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"])

    def upload(self, ckpt: Path, prefix: str) -> str:
        client = self.client()
        for f in sorted(os.listdir(ckpt)):
            client.upload_file(str(ckpt / f), BUCKET, f"{prefix}/{f}")
        return f"s3://{BUCKET}/{prefix}"

    def faults(self, faults: dict) -> None:
        self.control.write_text(json.dumps(faults))

    def records(self, prefix: str) -> list[dict]:
        if not self.log.exists():
            return []
        return [r for r in map(json.loads, self.log.read_text().splitlines())
                if r["key"].startswith(f"{BUCKET}/{prefix}/")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("s3ckpt") / "tiny"
    return make_checkpoint(tiny_config(num_hidden_layers=3), out, num_shards=3, dtype="float32", seed=5)


@pytest.fixture
def aws(s3, monkeypatch):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3


def _header_end(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _data_bytes(s3: S3Server, prefix: str, ckpt: Path) -> dict[int, int]:
    """Tensor bytes the server sent per rank (ranges past each shard's header)."""
    ends = {f.name: _header_end(f) for f in ckpt.glob("*.safetensors")}
    per_rank: dict[int, int] = {}
    for r in s3.records(prefix):
        name = r["key"].rsplit("/", 1)[1]
        if r.get("status") in (200, 206) and name in ends and r["range"]:
            start = int(r["range"].split("=")[1].split("-")[0])
            if start >= ends[name]:
                per_rank[r["rank"]] = per_rank.get(r["rank"], 0) + r["bytes"]
    return per_rank


def _equal_to_safetensors(pipe, ckpt: Path) -> int:
    reads = {m.name: m for s in pipe.plan.stages for m in s.reads}
    n = 0
    for src in pipe.plan.stage(pipe.rank).params:
        with safe_open(ckpt / reads[src.key].file, framework="pt") as f:
            assert torch.equal(pipe.module.get_parameter(src.param), f.get_tensor(src.key)), src.param
        n += 1
    return n


# ----------------------------------------------------------------------------- ranks

@pytest.mark.multiprocess
def test_two_ranks_fetch_exactly_their_bytes(s3, ckpt, tmp_path):
    url = s3.upload(ckpt, "two")
    proc = torchrun(2, [worker("s3_load.py"), str(tmp_path), url, str(ckpt), "{}"], env=s3.env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert "error" not in res, res["error"]
        assert res["checked"] > 0 and res["mismatches"] == []
        assert res["report"]["bytes_read"] == res["report"]["tensor_bytes"]
    sent = _data_bytes(s3, "two", ckpt)
    assert sent == {r: results[r]["report"]["tensor_bytes"] for r in range(2)}   # the server's count
    total = sum(f.stat().st_size - _header_end(f) for f in ckpt.glob("*.safetensors"))
    assert sum(sent.values()) == total                                           # 1.00x, no byte twice
    assert not list(tmp_path.glob("**/*.safetensors"))                           # no local copy


@pytest.mark.multiprocess
def test_two_nodes_with_the_disk_tier(s3, ckpt, tmp_path):
    """Two simulated nodes of one rank each, budgets that put some units on the disk tier:
    those go to each node's own offload store (copies: nothing local to reference)."""
    url = s3.upload(ckpt, "nodes")
    plan = distload.plan_job(str(ckpt), device="cpu", max_batch_size=1, max_seq_len=16)
    # each rank's device: a quarter of the weights, one streamed unit and its reserves
    device = sum(plan.unit_bytes.values()) // 4 + max(plan.unit_bytes.values()) + max(
        s.reserved_bytes for s in plan.stages)
    budget = json.dumps({"0": device, "1": device, "cpu": 0})
    envs = [{**os.environ, **s3.env, "OMP_NUM_THREADS": "1", "DISTLOAD_CACHE": str(tmp_path / f"cache{n}")}
            for n in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    for code, log in torchrun_nodes([1, 1], [worker("s3_load.py"), str(out), url, str(ckpt), budget, "--logits"], envs,
                                    timeout=180):
        assert code == 0, log[-3000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert "error" not in res, res["error"]
        assert res["mismatches"] == [] and res["report"]["bytes_read"] == res["report"]["tensor_bytes"]
    assert results[0]["logits_close"]
    disk = [r["report"]["offloaded_bytes_by_tier"]["disk"] for r in results]
    assert sum(disk) > 0, [r["tiers"] for r in results]
    for n, d in enumerate(disk):   # copies, written on the node's own store (none where it has no disk tier)
        store = tmp_path / f"cache{n}" / "offload"
        written = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) if store.exists() else 0
        assert written >= d and results[n]["report"]["offload_bytes_written"] >= d
    assert _data_bytes(s3, "nodes", ckpt) == {r: results[r]["report"]["tensor_bytes"] for r in range(2)}


# ----------------------------------------------------------------------------- faults

def _load(url: str, **kw):
    return distload.load(url, device="cpu", max_batch_size=1, max_seq_len=16, **kw)


def test_one_rank_bit_exact_and_a_500_is_retried(aws, ckpt):
    url = aws.upload(ckpt, "retry")
    aws.faults({f"{BUCKET}/retry/{LAST}": {"fail": 2}})
    pipe = _load(url)
    assert _equal_to_safetensors(pipe, ckpt) == len(pipe.plan.stage(0).params)
    failed = [r for r in aws.records("retry") if r.get("status") == 500]
    assert len(failed) == 2 and pipe.report["bytes_read"] == pipe.report["tensor_bytes"]


def test_a_cast_through_staging_in_small_requests(aws, ckpt):
    """float32 in the store, bfloat16 wanted: every request through a 64 KiB buffer (tensors
    cut across requests, neighbours sharing one), cast as safetensors' tensor.to() casts."""
    url = aws.upload(ckpt, "cast")
    pipe = _load(url, dtype="bfloat16", staging_bytes="64KiB", read_workers=3)
    reads = {m.name: m for s in pipe.plan.stages for m in s.reads}
    for src in pipe.plan.stage(0).params:
        with safe_open(ckpt / reads[src.key].file, framework="pt") as f:
            want = f.get_tensor(src.key).to(torch.bfloat16)
        assert torch.equal(pipe.module.get_parameter(src.param), want), src.param
    assert pipe.report["bytes_read"] == pipe.report["tensor_bytes"]
    assert 0 < pipe.report["staging_bytes"] <= 3 * (64 << 10)
    gets = [r for r in aws.records("cast") if r["range"] and not r["range"].startswith(("bytes=0-", "bytes=8-"))]
    assert max(r["bytes"] for r in gets) <= 64 << 10 and sum(r["bytes"] for r in gets) == pipe.report["tensor_bytes"]
    assert len(gets) < len(reads) and len(gets) >= -(-pipe.report["tensor_bytes"] // (64 << 10))


@pytest.mark.parametrize("fault, message", [
    ({"fail": -1}, "a ranged GET of bytes .* failed: InternalError"),
    ({"truncate": True}, "the store sent .* bytes .* truncated response"),
])
def test_a_failing_object_is_named(aws, ckpt, fault, message):
    prefix = "f" + str(abs(hash(json.dumps(fault))) % 10**6)
    url = aws.upload(ckpt, prefix)
    aws.faults({f"{BUCKET}/{prefix}/{LAST}": fault})
    with pytest.raises(CheckpointError, match=f"^{url}/{LAST}: {message}") as info:
        _load(url)
    assert "\n" not in str(info.value)


def test_a_missing_or_replaced_object_is_named(aws, ckpt):
    url = aws.upload(ckpt, "gone")
    client = aws.client()

    def delete(plan, root):
        client.delete_object(Bucket=BUCKET, Key=f"gone/{LAST}")

    with pytest.raises(CheckpointError, match=f"^{url}/{LAST}: no such object"):
        _load(url, before_read=delete)
    url = aws.upload(ckpt, "replaced")
    data = (ckpt / LAST).read_bytes()

    def replace(plan, root):   # same size, other bytes: only the ETag tells
        client.put_object(Bucket=BUCKET, Key=f"replaced/{LAST}", Body=data[:-4] + b"\0\0\0\1")

    with pytest.raises(CheckpointError, match=f"^{url}/{LAST} changed since rank 0 planned"):
        _load(url, before_read=replace)


def test_a_get_pins_the_planned_version(aws, ckpt):
    """Past the check, each ranged GET asks for the plan's ETag (If-Match)."""
    from distload.sources.s3 import S3Reader

    aws.upload(ckpt, "pinned")
    index = distload.sources.open_source(f"s3://{BUCKET}/pinned").index()
    meta = index.relative()[0][next(n for n, m in index.tensors.items() if m.file.endswith(LAST))]
    reader = S3Reader(BUCKET, "pinned", {LAST: '"0123456789abcdef0123456789abcdef"'})
    with pytest.raises(CheckpointError, match=f"pinned/{LAST} changed since rank 0 planned"):
        reader.read([meta], {meta.name: torch.empty(meta.shape, dtype=meta.torch_dtype)})


def test_bad_credentials(aws, ckpt, monkeypatch):
    url = aws.upload(ckpt, "creds")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(CheckpointError, match=f"^{url}/: listing it was refused \\(InvalidAccessKeyId\\)"):
        _load(url)


def test_load_checkpoint_and_dispatch_from_s3(aws, ckpt, tmp_path):
    """accelerate's workflow (its cpu and disk tiers: one loading path, the source's reader)
    from an s3:// checkpoint, against transformers on the original files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distload import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

    url = aws.upload(ckpt, "dispatch")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt), dtype=torch.float32)
    device_map = infer_auto_device_map(model, max_memory={"cpu": 400_000})
    assert {"cpu", "disk"} <= set(device_map.values())
    model = load_checkpoint_and_dispatch(model, url, device_map=device_map, offload_folder=tmp_path / "off")
    ids = torch.tensor([[3, 17, 42, 9]])
    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert any((tmp_path / "off").rglob("*"))


def test_gs_urls_go_to_cloud_storage_s_xml_api(aws, ckpt, monkeypatch):
    """gs://bucket/prefix: the same source through Cloud Storage's S3-compatible endpoint
    (here the test server, through DISTLOAD_GCS_ENDPOINT), never through the s3:// one."""
    from distload.sources.s3.client import GCS_ENDPOINT, s3_client

    aws.upload(ckpt, "gcs")
    monkeypatch.setenv("DISTLOAD_GCS_ENDPOINT", aws.env["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")   # nothing listens
    pipe = _load(f"gs://{BUCKET}/gcs")
    assert pipe.plan.source["url"] == f"gs://{BUCKET}/gcs"
    assert _equal_to_safetensors(pipe, ckpt) == len(pipe.plan.stage(0).params)
    assert pipe.report["bytes_read"] == pipe.report["tensor_bytes"]
    monkeypatch.delenv("DISTLOAD_GCS_ENDPOINT")
    monkeypatch.delenv("AWS_REGION")
    client = s3_client("gs")   # made, not called: Cloud Storage's endpoint, region "auto"
    assert client.meta.endpoint_url == GCS_ENDPOINT and client.meta.region_name == "auto"
