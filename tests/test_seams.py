"""The seams: a plan names no path of rank 0's machine, and a new checkpoint source, model
type or pipeline schedule is one registration (each checked end to end in one process,
against transformers or safetensors, never against distload itself)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import importlib

import pytest
import torch
from safetensors import safe_open

import distload
from distload.checkpoint import index_checkpoint
from distload.models import LlamaConfig, LlamaForCausalLM, ModelFamily, registry
from distload.pipeline.schedules import registry as schedules
from distload.pipeline.schedules.registry import Schedule
from distload import dist
from distload.cli import config as cli_config
from distload.cli.config import parse_args
from distload.dist import World
from distload.io import Reader, ReadOptions, ReadStats, read_option
from distload.loader.fetch import fetch_node_files
from distload.sources import DemoSource, HubSource, LocalSource, Source, base, open_source
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("seams") / "ckpt"
    return make_checkpoint(tiny_config(num_hidden_layers=2), out, num_shards=2, dtype="float32", seed=9)


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def test_plan_json_holds_no_absolute_path(ckpt):
    plan = distload.plan_job(str(ckpt), device="cpu")
    text = plan.to_json()
    assert str(ckpt) not in text and str(ckpt.parent) not in text
    strings = list(_strings(json.loads(text)))
    assert not [s for s in strings if os.path.isabs(s)]
    files = {m.file for s in plan.stages for m in s.reads}
    assert files == set(plan.file_sizes) and files == {p.name for p in ckpt.glob("*.safetensors")}
    assert plan.source == {"kind": "local", "label": "ckpt"}


def test_a_plan_loads_from_another_copy_of_the_checkpoint(ckpt, tmp_path):
    """What a second node does: the same relative files under its own root."""
    plan = distload.plan_job(str(ckpt), device="cpu")
    copy = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(ckpt, copy)
    pipe = distload.load(str(copy), device="cpu")
    assert pipe.root == str(copy)
    assert [s.reads for s in pipe.plan.stages] == [s.reads for s in plan.stages]  # same relative items
    for src in pipe.plan.stage(0).params:
        meta = index_checkpoint(copy).tensors[src.key]
        with safe_open(meta.file, framework="pt") as f:
            assert torch.equal(pipe.module.get_parameter(src.param), f.get_tensor(src.key))


def test_a_new_source_is_one_registration(ckpt, tmp_path, monkeypatch):
    """A source of its own: `vault:NAME` names a directory under a vault root."""
    vault = tmp_path / "vault"
    shutil.copytree(ckpt, vault / "tiny")

    class VaultSource(Source):
        kind = "vault"

        @classmethod
        def claims(cls, spec):
            return spec.startswith("vault:")

        def index(self):
            return index_checkpoint(self.root())

        def identity(self):
            return {"kind": self.kind, "label": self.spec}

        def root(self):
            return str(vault / self.spec.removeprefix("vault:"))

    monkeypatch.setattr(base, "_SOURCES", [VaultSource, *base._SOURCES])
    pipe = distload.load("vault:tiny", device="cpu")
    assert pipe.plan.source == {"kind": "vault", "label": "vault:tiny"}
    ids = torch.tensor([[3, 17, 42, 9]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.forward(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_a_new_reader_is_one_class_its_source_returns(ckpt, monkeypatch):
    """A reader of its own (plain buffered file reads), chosen by its source's `reader()`:
    the loader, the tiers and the offload store reach the bytes only through it. (A
    GPUDirect or io_uring reader is the same: a module under `distload/io/` and the one
    line of a source's `reader()` that returns it.)"""
    seen: list[str] = []

    class BufferedReader(Reader):
        def __init__(self, directory, options=None):
            super().__init__(options)
            self.directory = directory

        def read(self, reads, dests, *, progress=None, workers=None):
            stats = ReadStats()
            for m in reads:
                with open(os.path.join(self.directory, m.file), "rb") as f:
                    f.seek(m.offset)
                    raw = bytearray(f.read(m.length))
                dests[m.name].copy_(torch.frombuffer(raw, dtype=m.torch_dtype).view(m.shape))
                stats.bytes_read += m.length
                seen.append(m.name)
            return stats

        def entry_source(self, file):
            st = os.stat(os.path.join(self.directory, file))
            return os.path.join(self.directory, file), st.st_size, st.st_mtime_ns

    class BufferedSource(LocalSource):
        kind = "buffered"

        @classmethod
        def claims(cls, spec):
            return spec.startswith("buffered:")

        def __init__(self, spec, **kw):
            super().__init__(spec.removeprefix("buffered:"), **kw)

        def reader(self, options=None):
            return BufferedReader(self.root(), options)

    monkeypatch.setattr(base, "_SOURCES", [BufferedSource, *base._SOURCES])
    pipe = distload.load(f"buffered:{ckpt}", device="cpu", read_workers=3)
    assert sorted(seen) == sorted(m.name for m in pipe.plan.stage(0).reads)   # every byte came through it
    assert pipe.report["bytes_read"] == pipe.report["tensor_bytes"]
    assert pipe.report["read_options"]["workers"] == 3
    ids = torch.tensor([[3, 17, 42, 9]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.forward(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_the_object_store_source_is_one_package_and_one_registration():
    """`distload/sources/s3/` is named by one line outside itself (its registering import);
    the read options are declared once, and the CLI's per-rank flags derive from them."""
    package = Path(distload.__file__).parent
    mentions = [(str(p.relative_to(package)), line) for p in package.rglob("*.py")
                if "s3" not in p.relative_to(package).parts
                for line in p.read_text().splitlines() if "from .s3" in line or "sources.s3" in line]
    assert mentions == [("sources/__init__.py", "from .s3 import S3Source  # noqa: F401 - registers "
                                                "(boto3 imported only when used)")]
    assert type(open_source("s3://bucket/prefix")).__name__ == "S3Source"
    cli_main = importlib.import_module("distload.cli.main")   # `distload.cli.main` is also a function
    given = parse_args(["--read-workers", "3", "--staging-size", "1MiB", "--direct-io"])
    assert given.read_options == ReadOptions(workers=3, staging_bytes=1 << 20, direct_io=True)
    assert cli_main._flags(given) == cli_main._flags(parse_args([]))    # node-local: never compared


def test_a_new_model_type_is_one_registration(ckpt, tmp_path, monkeypatch):
    """A family of its own for `model_type: "toyllama"` (a llama under another name)."""
    renamed = tmp_path / "toy"
    shutil.copytree(ckpt, renamed)
    config = json.loads((renamed / "config.json").read_text())
    (renamed / "config.json").write_text(json.dumps({**config, "model_type": "toyllama"}))

    class ToyLlama(LlamaForCausalLM):
        pass

    def read_config(d):
        return LlamaConfig.from_dict({**d, "model_type": "llama"})

    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    registry.register_family(ModelFamily(("toyllama",), read_config, ToyLlama))
    pipe = distload.load(str(renamed), device="cpu")
    assert type(pipe.module) is ToyLlama and "toyllama" in registry.supported_model_types()
    ids = torch.tensor([[3, 17, 42, 9]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.forward(ids), reference(ids).logits, atol=1e-4, rtol=0)


def test_a_new_schedule_is_one_registration(ckpt, monkeypatch):
    """A schedule of its own: the last position's logits only, run through `pipe.run`."""
    def last_logits(pipe, ids):
        pipe.start_call("last_logits")
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.no_grad():
            return pipe.module(ids, position_ids=positions, last_only=True)

    monkeypatch.setattr(schedules, "_SCHEDULES", dict(schedules._SCHEDULES))
    schedules.register_schedule(Schedule("last_logits", last_logits, lambda pipe: None))
    pipe = distload.load(str(ckpt), device="cpu")
    ids = torch.tensor([[3, 17, 42, 9], [5, 6, 7, 8]])
    torch.testing.assert_close(pipe.run("last_logits", ids), pipe.forward(ids)[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown pipeline schedule 'nope'.*last_logits"):
        pipe.run("nope")


@pytest.mark.multiprocess
def test_read_options_are_node_local_and_reported_per_rank(ckpt, tmp_path):
    """Ranks given different read options (declared once, `ReadOptions`) agree on the rest
    and load; each rank's report holds its own."""
    from .mp import Ranks, worker

    report = tmp_path / "report.json"
    cli = [worker("cli_slowed.py"), "--device", "cpu", "--model", str(ckpt), "--max-new-tokens", "0",
           "--report", str(report)]
    job = Ranks([[*cli, "--read-workers", "1"], [*cli, "--read-workers", "3", "--staging-size", "1MiB"]],
                tmp_path)
    assert job.wait(90) == [0, 0], job.stderr(0)[-2000:] + job.stderr(1)[-2000:]
    ranks = json.loads(report.read_text())["ranks"]
    assert [r["read_options"] for r in ranks] == [
        {"workers": 1, "staging_bytes": 16 << 20, "direct_io": False},
        {"workers": 3, "staging_bytes": 1 << 20, "direct_io": False}]


def test_the_jobs_store_has_one_getter():
    """Every store protocol goes through `dist.job_store`: torch's private getter is named
    in dist.py alone; without a process group there is no job store."""
    package = Path(distload.__file__).parent
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "_get_default_store" in p.read_text())
    assert users == ["dist.py"]
    with pytest.raises(RuntimeError, match="init_world"):
        dist.job_store()
    assert dist.job_key("abc", "call", "") == "distload/abc/call/"


def test_each_source_decides_what_a_node_fetches(ckpt):
    """Sources decide (`Source.node_files`); the loader only asks the leader to fetch that."""
    reads = ["model-00002-of-00002.safetensors"]
    assert LocalSource(str(ckpt)).node_files(reads) == ()
    assert open_source("s3://bucket/prefix").node_files(reads) == ()        # read in place
    assert DemoSource("demo").node_files(reads) == tuple(reads)            # made whole on the node
    hub = HubSource("acme/tiny")
    hub.check({"kind": "hub", "label": "acme/tiny@" + "a" * 40, "repo": "acme/tiny", "revision": "a" * 40,
               "support": ["tokenizer.json", "config.json"]})
    assert hub.node_files(reads) == ("config.json", reads[0], "tokenizer.json")

    class OneFile(LocalSource):
        def __init__(self, spec, **kw):
            super().__init__(spec, **kw)
            self.asked, self.fetched = [], []

        def node_files(self, reads):
            self.asked.append(tuple(reads))
            return tuple(reads[-1:])

        def fetch(self, files, *, sizes=None):
            self.fetched.append((tuple(files), dict(sizes)))
            return 7

    plan = distload.plan_job(str(ckpt), device="cpu")
    world = World(0, 1, 0, torch.device("cpu"), None)
    source = OneFile(str(ckpt))
    read = sorted({m.file for m in plan.stage(0).reads})
    assert fetch_node_files(world, source, plan) == (str(ckpt), 7)
    assert source.asked == [tuple(read)]
    assert source.fetched == [((read[-1],), {read[-1]: plan.file_sizes[read[-1]]})]

    class Never(LocalSource):
        def fetch(self, files, *, sizes=None):
            raise AssertionError(f"asked to fetch {files}")

    assert fetch_node_files(world, Never(str(ckpt)), plan) == (str(ckpt), 0)


def test_a_new_read_option_is_one_line_and_gets_its_flag(capsys):
    """A field added to `ReadOptions` (here in a subclass) is a CLI flag, parsed into the
    options, reported; a bad value is one line naming the flag."""
    @dataclass(frozen=True)
    class MoreOptions(ReadOptions):
        queue_depth: int = read_option(32, flag="io_queue_depth", help="requests in flight per file")

    parser = cli_config._parser(MoreOptions)
    assert "--io-queue-depth" in parser.format_help() and "requests in flight per file" in parser.format_help()
    values = vars(parser.parse_args(["--io-queue-depth", "8", "--staging-size", "1MiB", "--no-direct-io"]))
    options = cli_config.read_options_from(values, MoreOptions)
    assert options == MoreOptions(queue_depth=8, staging_bytes=1 << 20, direct_io=False)
    assert options.report()["queue_depth"] == 8 and not set(MoreOptions.flags()) & set(values)
    assert cli_config.read_options_from({}, MoreOptions) == MoreOptions()      # not given: the defaults
    for argv, line in ((["--staging-size", "1KiB"], "staging_bytes (--staging-size) must be at least 64KiB"),
                       (["--staging-size", "20G"], "--staging-size 20G: memory size '20G' is ambiguous"),
                       (["--read-workers", "0"], "read_workers (--read-workers) must be at least 1")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        assert exit_.value.code == 2 and line in capsys.readouterr().err
