"""`python -m distload.serve` with 2 ranks on 127.0.0.1, talked to with the real `openai`
client and plain HTTP (`httpx`): completions and chat, streamed and not, against
transformers' `generate` of each request alone (greedy) and its `apply_chat_template`;
bad requests (400 naming the field), a full queue (429 + Retry-After), clients that go
away (their KV slots freed), a bounded load test, /health while loading, /metrics, and
SIGTERM draining in-flight requests before every rank exits 143."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from distload.sources.demo import make_checkpoint

from .conftest import tiny_config
from .mp import free_port

transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.multiprocess

MODEL = "tiny-chat"
SLOTS, QUEUE, CONTEXT = 4, 8, 128  # 2 groups of 2 sequences; a small queue to fill
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] | trim }} "
            "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")


def _checkpoint(path):
    """A tiny Llama with a word-level tokenizer and a chat template, as a hub repo has them."""
    make_checkpoint(tiny_config(bos_token_id=1, eos_token_id=2, max_position_embeddings=CONTEXT),
                    path, num_shards=2, dtype="float32", seed=5)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = ["<unk>", "<s>", "</s>", ":", "user", "assistant", "system", ".", ","]
    words += [f"w{i}" for i in range(256 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": TEMPLATE}))
    return path


class _Server:
    """The two ranks as plain processes (as srun or a launcher starts them), so that the
    test starts rank 1 only once rank 0's /health answered 503."""

    def __init__(self, ckpt, out_dir, port: int, world: int = 2) -> None:
        self.url, self.out_dir, self.procs, self.world = f"http://127.0.0.1:{port}", out_dir, [], world
        self.argv = [sys.executable, "-m", "distload.serve", "--model", str(ckpt), "--port", str(port),
                     "--served-model-name", MODEL, "--max-batch-size", str(SLOTS), "--max-seq-len",
                     str(CONTEXT), "--max-queue", str(QUEUE), "--shutdown-timeout", "20",
                     "--device", "cpu"]
        self.master = free_port()

    def start(self, rank: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(self.world), "LOCAL_WORLD_SIZE": str(self.world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.master)}
        err = open(self.out_dir / f"rank{rank}.err", "w")
        self.procs.append(subprocess.Popen(self.argv, env=env, stdout=subprocess.DEVNULL, stderr=err))
        err.close()

    def stderr(self, rank: int) -> str:
        return (self.out_dir / f"rank{rank}.err").read_text()

    def wait_health(self, want: int, timeout: float = 60) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in self.procs), self.stderr(0) + self.stderr(-1 + len(self.procs))
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == want:
                    return r
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"/health never answered {want}:\n{self.stderr(0)}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The references and the in-process scheduler on one thread, as each rank runs: on a
    shared 2-core machine, torch's default threads spin against the ranks (10-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("serve_http") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    srv = _Server(ckpt, tmp_path_factory.mktemp("serve_logs"), free_port())
    srv.start(0)
    try:
        loading = srv.wait_health(503)   # rank 0 waits for rank 1: /health says loading
        assert loading.json()["status"] == "loading" and loading.headers["retry-after"]
        srv.start(1)
        srv.wait_health(200)
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def hf(ckpt):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(ckpt)


def _reference(hf, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy generate of this request alone (through EOS, if it comes)."""
    model, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [1] + [rng.randrange(3, 256) for _ in range(length - 1)]


def test_models_completions_and_chat_match_transformers(server, hf):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [MODEL]
    # text prompt, not streamed
    ids = hf[1]("w1 w2 . w3").input_ids
    done = client.completions.create(model=MODEL, prompt="w1 w2 . w3", max_tokens=9, temperature=0)
    want = _reference(hf, ids, 9)
    assert done.choices[0].token_ids == want
    assert done.choices[0].text == hf[1].decode(want, skip_special_tokens=True)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), len(want))
    # token ids, streamed, with usage at the end
    ids = _prompt(random.Random(0), 11)
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    got = [t for c in chunks if c.choices for t in getattr(c.choices[0], "token_ids", None) or []]
    assert got == _reference(hf, ids, 12)
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == len(got) and not chunks[-1].choices
    # chat, as transformers' apply_chat_template renders it, streamed and not
    messages = [{"role": "system", "content": "w7 w8"}, {"role": "user", "content": "w5 w6 ."}]
    ids = hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    want = _reference(hf, list(ids), 10)
    text = hf[1].decode(want, skip_special_tokens=True)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == text and chat.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    # sampling: the same seed gives the same tokens
    a, b = (client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0.9,
                                      top_p=0.9, seed=7).choices[0].token_ids for _ in range(2))
    assert a == b
    # stop: a token id and a string
    stop_at = want[3]
    cut = client.completions.create(model=MODEL, prompt=list(ids), max_tokens=10, temperature=0,
                                    extra_body={"stop_token_ids": [stop_at]})
    assert cut.choices[0].token_ids == want[:want.index(stop_at) + 1]
    assert cut.choices[0].finish_reason == "stop"
    word = hf[1].decode([want[2]])
    cut = client.completions.create(model=MODEL, prompt=list(ids), max_tokens=10, temperature=0,
                                    stop=[word])
    assert cut.choices[0].text == hf[1].decode(want, skip_special_tokens=True).split(word)[0]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,param", [
    ("{not json", None),
    ({"model": MODEL, "prompt": [1, 2], "max_tokens": "5"}, "max_tokens"),
    ({"model": "gpt-4", "prompt": [1, 2]}, "model"),
    ({"model": MODEL, "prompt": [1, 2], "max_tokens": CONTEXT}, "max_tokens"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [1, 256]}, "prompt"),
    ({"model": MODEL, "prompt": [1, 2], "n": 2}, "n"),
    ({"model": MODEL, "prompt": [1, 2], "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": [1, 2], "logprobs": 3}, "logprobs"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]
    with pytest.raises(openai.BadRequestError):  # the real client sees the same
        _client(server).completions.create(model="gpt-4", prompt=[1, 2])


def _gauges(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_full_queue_is_429_and_gone_clients_free_their_slots(server):
    """More streams than slots + queue: the rest get 429 with Retry-After; the admitted ones
    are closed after their first token, and every KV slot comes back."""
    body = {"model": MODEL, "prompt": [1, 5, 6, 7], "max_tokens": 100, "temperature": 0, "stream": True}
    statuses, opened, lock = [], [], threading.Lock()
    client = httpx.Client(timeout=30)
    barrier = threading.Barrier(SLOTS + QUEUE + 6)

    def one():
        barrier.wait()
        ctx = client.stream("POST", server.url + "/v1/completions", json=body)
        r = ctx.__enter__()
        with lock:
            statuses.append((r.status_code, r.headers.get("retry-after")))
            opened.append((ctx, r))

    threads = [threading.Thread(target=one) for _ in range(SLOTS + QUEUE + 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [s for s in statuses if s[0] == 429]
    assert len(refused) >= 6 and all(ra for _, ra in refused), statuses
    assert all(code in (200, 429) for code, _ in statuses)
    admitted = [r for _, r in opened if r.status_code == 200]
    next(admitted[0].iter_lines())  # one client leaves mid-stream, the others before a token
    for ctx, _ in opened:
        ctx.__exit__(None, None, None)
    client.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        g = _gauges(server)
        if g["distload_kv_slots_used"] == 0 and g["distload_queue_depth"] == 0:
            break
        time.sleep(0.1)
    assert g["distload_kv_slots_used"] == 0 and g["distload_queue_depth"] == 0, g
    assert g["distload_kv_slots_total"] == SLOTS
    assert g['distload_requests_total{endpoint="/v1/completions",status="429"}'] >= 6


def test_load_64_requests_16_clients_staggered_all_match_transformers(server, hf):
    """Requests of different lengths arriving at different times share groups; each one's
    greedy tokens are transformers' for it alone. A 429 is retried after its Retry-After."""
    rng = random.Random(1)
    jobs = [(_prompt(rng, rng.randrange(2, 24)), rng.randrange(1, 14), rng.random() * 0.3)
            for _ in range(64)]
    client = httpx.Client(timeout=60)

    def one(job):
        ids, max_tokens, delay = job
        time.sleep(delay)
        for _ in range(200):
            r = client.post(server.url + "/v1/completions",
                            json={"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0})
            if r.status_code != 429:
                break
            time.sleep(float(r.headers["retry-after"]) / 10)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, jobs))
    seconds = time.monotonic() - start
    client.close()
    for (ids, max_tokens, _), tokens in zip(jobs, got):
        assert tokens == _reference(hf, ids, max_tokens), ids
    assert seconds < 60


def test_sigterm_drains_in_flight_then_every_rank_exits_143(server):
    """Last in this file: stops the module's server."""
    body = {"model": MODEL, "prompt": [1, 9, 8, 7], "max_tokens": 120, "temperature": 0, "stream": True}
    others = ThreadPoolExecutor(4)  # more work in flight, so the drain lasts
    more = [others.submit(httpx.post, server.url + "/v1/completions", timeout=60,
                          json={**body, "stream": False, "prompt": [1, i + 3]}) for i in range(4)]
    events: list[str] = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        # the four others are admitted before the signal (on a loaded machine their threads
        # may not have posted yet, and a request after it is refused with 503)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            g = _gauges(server)
            if g["distload_running_sequences"] + g["distload_queue_depth"] >= 5:
                break
            time.sleep(0.02)
        for p in server.procs:  # as torchrun (or Slurm) forwards it to every rank
            p.send_signal(signal.SIGTERM)
        health = httpx.get(server.url + "/health")
        for _ in range(50):
            if health.status_code == 503:
                break
            time.sleep(0.02)
            health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "stopping"
        refused = httpx.post(server.url + "/v1/completions", json=body)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        events += [line for line in lines if line]
    assert all(f.result().json()["choices"][0]["finish_reason"] == "length" for f in more)
    others.shutdown()
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length"
    codes = [p.wait(60) for p in server.procs]
    assert codes == [143, 143], (server.stderr(0), server.stderr(1))
    for rank in (0, 1):
        lines = [line for line in server.stderr(rank).splitlines() if "Traceback" in line or "ERROR" in line]
        assert not lines, server.stderr(rank)
        assert "stopped by SIGTERM" in server.stderr(rank).strip().splitlines()[-1]


def test_three_ranks_then_a_rank_that_dies_takes_the_server_down_naming_it(ckpt, hf, tmp_path):
    """3 ranks (a middle one forwards every message): staggered greedy requests match
    transformers; then the middle rank dies and rank 0 stops, naming it."""
    srv = _Server(ckpt, tmp_path, free_port(), world=3)
    try:
        for rank in range(3):
            srv.start(rank)
        srv.wait_health(200)
        rng = random.Random(2)
        jobs = [(_prompt(rng, rng.randrange(2, 20)), rng.randrange(1, 12), rng.random() * 0.2)
                for _ in range(8)]

        def one(job):
            ids, max_tokens, delay = job
            time.sleep(delay)
            r = httpx.post(srv.url + "/v1/completions", timeout=60,
                           json={"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(one, jobs))
        for (ids, max_tokens, _), tokens in zip(jobs, got):
            assert tokens == _reference(hf, ids, max_tokens), ids
        srv.procs[1].kill()
        assert srv.procs[0].wait(30) == 1
        last = srv.stderr(0).strip().splitlines()[-1]
        assert "rank 1 died" in last and "Traceback" not in srv.stderr(0), srv.stderr(0)
    finally:
        srv.kill()


# ----------------------------------------------------------------------------- pure parts

def test_params_defaults_and_sampling():
    from distload.serve.params import Limits, chat_params, check_length, completion_params

    limits = Limits(MODEL, 256, CONTEXT)
    p = completion_params({"model": MODEL, "prompt": ["w1"], "stop": ["x", 5], "top_k": -1}, limits)
    assert p.prompt == "w1" and p.max_tokens == 16 and p.sampling.do_sample and p.sampling.top_k is None
    assert p.stop_strings == ("x",) and p.stop_ids == (5,)
    p = chat_params({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "temperature": 0,
        "top_p": 0.5, "max_completion_tokens": 3}, limits)
    assert p.prompt[0]["content"] == "ab" and not p.sampling.do_sample and p.max_tokens == 3
    assert check_length([1] * 100, None, limits, prompt_key="prompt", key="max_tokens") == CONTEXT - 100


def test_sequence_holds_back_a_possible_stop_string_and_cuts_at_it():
    from distload.pipeline.sampling import SamplingConfig
    from distload.serve.sequence import Delta, Done, Sequence

    class Words:  # decodes token i as the word "w<i>", space-separated
        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    events = []
    seq = Sequence(prompt=[1], max_tokens=10, sampling=SamplingConfig(), stop_ids={2},
                   stop_strings=("w7 w8",), text=Words(), emit=events.append)
    for token in (5, 7, 8, 9):
        if seq.accept(token):
            break
    texts = [e.text for e in events if isinstance(e, Delta)]
    assert "".join(texts) == "w5 " and seq.generated_text == "w5 "
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
    assert [e.token_ids for e in events if isinstance(e, Delta)] == [[5], [7], [8]]


def test_kv_cache_pad_left_and_drop_left():
    from distload.models.cache import KVCache

    cache = KVCache()
    k = torch.arange(12.0).reshape(1, 1, 3, 4)
    cache.update("0", k, k + 1)
    cache.pad_left(2)
    assert cache.length == 5 and torch.equal(cache.update("0", k[:, :, :0], k[:, :, :0])[0][:, :, 2:], k)
    cache.drop_left(2)
    assert torch.equal(cache.update("0", k[:, :, :0], k[:, :, :0])[1], k + 1)
    # a windowed layer (keeps 2): padding counts as seen, but it still holds its last 2
    window = KVCache()
    window.update("0", k, k, keep=2)
    window.pad_left(4)
    assert window.seq_length("0") == 7 and window.kept_length("0") == 2
    short = KVCache()
    short.update("0", k[:, :, :1], k[:, :, :1], keep=2)
    short.pad_left(6)     # one token: a padding slot joins it in the window
    assert short.seq_length("0") == 7 and short.kept_length("0") == 2
    both = KVCache.stacked([window, short])
    assert both.batch_size == 2 and both.kept_length("0") == 2
    both.drop_left(6)
    assert both.seq_length("0") == 1 and both.kept_length("0") == 1
    none = torch.empty(2, 1, 0, 4)
    assert torch.equal(both.update("0", none, none)[0][1], k[0, :, :1])   # short's one token


def test_scheduler_in_one_process_joins_and_leaves_match_transformers(ckpt, hf):
    """The scheduler over a world of one (rank 0 is every stage): 2 groups of 2 slots, 10
    requests of different lengths arriving while others run, some done at their first token,
    one cancelled mid-way; every greedy answer is transformers' for it alone."""
    import distload
    from distload.pipeline.sampling import SamplingConfig
    from distload.serve.scheduler import Scheduler
    from distload.serve.sequence import Sequence

    class NoText:
        def decode(self, ids):
            return ""

    pipe = distload.load(str(ckpt), device="cpu", max_batch_size=4, max_seq_len=CONTEXT)
    scheduler = Scheduler(pipe, groups=2, group_size=2, max_queue=100)
    rng = random.Random(3)
    seqs = [Sequence(prompt=_prompt(rng, rng.randrange(2, 20)), max_tokens=rng.choice([1, 2, 7, 15]),
                     sampling=SamplingConfig(), stop_ids={2}, stop_strings=(), text=NoText(),
                     emit=lambda e: None) for _ in range(10)]

    def arrive():
        for i, seq in enumerate(seqs):
            assert scheduler.submit(seq)
            if i == 6:
                time.sleep(0.01)
                seq.cancel()
            time.sleep(0.005 * (i % 3))
        scheduler.drain(60)

    feeder = threading.Thread(target=arrive)
    feeder.start()
    scheduler.run()
    feeder.join()
    for i, seq in enumerate(seqs):
        want = _reference(hf, seq.prompt, seq.max_tokens)
        if i == 6:
            assert seq.output == want[:len(seq.output)]
        else:
            assert seq.output == want and seq.finish_reason in ("stop", "length")
    assert all(g.used == 0 and not g.cached for g in scheduler.groups)
    assert scheduler.decoder.calls >= 1 and not scheduler.decoder.is_open  # close() found no KV held
    assert not scheduler.decoder.local.configs  # nor any sequence's sampling state

    # past the shutdown deadline, what still runs (or waits) is aborted, and its KV freed
    from distload.serve.sequence import Done

    scheduler = Scheduler(pipe, groups=2, group_size=2, max_queue=100)
    events = []
    long = [Sequence(prompt=[1, 5 + i], max_tokens=CONTEXT - 2, sampling=SamplingConfig(), stop_ids=set(),
                     stop_strings=(), text=NoText(), emit=events.append) for i in range(6)]
    for seq in long:
        assert scheduler.submit(seq)
    threading.Timer(0.2, scheduler.drain, args=(0.1,)).start()
    scheduler.run()
    assert all(seq.finish_reason == "abort" for seq in long)
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 6 and all(e.error for e in done)
    assert not scheduler.decoder.is_open and not scheduler.decoder.local.configs


def test_scheduler_with_sliding_window_layers_matches_transformers(tmp_path):
    """Continuous batching over a model whose sliding layers cache only their window's last
    W - 1 tokens (gpt-oss: window 4, sliding and full layers alternating, sinks): requests
    shorter and longer than the window join groups of other lengths (left-padded, stacked,
    leading padding dropped) and leave them; every greedy answer is transformers' for it
    alone, and the windowed layers never hold more than W - 1 positions between steps."""
    import distload
    from distload.pipeline.sampling import SamplingConfig
    from distload.serve.scheduler import Scheduler
    from distload.serve.sequence import Sequence

    from .arch_checks import check_greedy_answers
    from .archs import VOCAB, make_hf_checkpoint
    from .archs_more import more_config

    class NoText:
        def decode(self, ids):
            return ""

    path = make_hf_checkpoint("gpt_oss", tmp_path / "gpt_oss", more_config("gpt_oss"))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    pipe = distload.load(str(path), device="cpu", max_batch_size=4, max_seq_len=64)
    held = []
    update = type(pipe.module.new_cache()).update

    def watched(cache, key, k, v, *, keep=None):   # what a windowed layer holds after each step
        out = update(cache, key, k, v, keep=keep)
        if keep is not None:
            held.append(cache.kept_length(key) <= keep)
        return out

    scheduler = Scheduler(pipe, groups=2, group_size=2, max_queue=100)
    rng = random.Random(5)
    seqs = [Sequence(prompt=[1] + [rng.randrange(3, VOCAB) for _ in range(n - 1)], max_tokens=m, sampling=SamplingConfig(), stop_ids=set(),
                     stop_strings=(), text=NoText(), emit=lambda e: None)
            for n, m in ((9, 8), (2, 10), (5, 3), (3, 9), (12, 6), (2, 1), (7, 9), (4, 5))]

    def arrive():
        for i, seq in enumerate(seqs):
            assert scheduler.submit(seq)
            time.sleep(0.004 * (i % 3))
        scheduler.drain(60)

    from unittest import mock

    with mock.patch.object(type(pipe.module.new_cache()), "update", watched):
        feeder = threading.Thread(target=arrive)
        feeder.start()
        scheduler.run()
        feeder.join()
    assert held and all(held)
    check_greedy_answers(model, seqs)
    assert all(g.used == 0 and not g.cached for g in scheduler.groups)
