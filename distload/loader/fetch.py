"""Each node's leader brings in what its source says the node needs for the files its
ranks read (`Source.node_files`: a hub id's shards, the demo checkpoint, or nothing); every
rank waits for every leader — on the job's store, not in a collective. This module only
coordinates (who fetches, who waits, how a failure reaches everyone), whatever the source.

A download can take far longer than the process group's timeout (a gloo or NCCL
collective fails after it), and one node's can end long before another's. So leaders
publish their outcome under keys in the job's store (`distload.dist.job_store`), and
every rank waits on those keys in chunks with no overall limit, while each leader still
working bumps a heartbeat key every few seconds: a leader whose heartbeat stops for the
timeout (its process died on a node whose launcher did not end the job, or it hangs)
fails every rank with a message naming it. A leader's error reaches every rank: its own
rank re-raises it, the others raise `RankError` naming that rank. Per load: one broadcast
(the keys' prefix), then a few store round trips per rank, and the heartbeat checks
while waiting.

Example::

    root, fetched = fetch_node_files(world, source, plan)   # every rank
"""

from __future__ import annotations

import pickle
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from ..dist import (DEFAULT_TIMEOUT_S, STORE_HEARTBEAT_S, STORE_POLL_S, World, agree, job_key, job_store,
                    run_on_rank0)
from ..errors import RankError
from ..log import logger
from ..plan.types import LoadPlan
from ..sources import Source

__all__ = ["fetch_node_files", "on_node_leaders"]

T = TypeVar("T")
HEARTBEAT_S = STORE_HEARTBEAT_S   # a working leader bumps its heartbeat this often


def fetch_node_files(world: World, source: Source, plan: LoadPlan, *,
                     timeout_s: float = DEFAULT_TIMEOUT_S, verify_checksums: bool = False) -> tuple[str, int]:
    """Every rank: (the checkpoint's root on this node, the bytes this rank fetched — its
    node's download if it is the leader, else 0), once every node's leader made the files
    its node's ranks read present (and, with `verify_checksums`, checked their digests:
    `Source.verify`). `timeout_s` bounds only how long a leader may go silent, never the
    download itself."""
    error = None
    try:
        source.check(plan.source)
    except Exception as exc:  # noqa: BLE001 - every rank learns of it in agree()
        error = exc
    agree(world, error, what="checking the plan's checkpoint")
    node_ranks = world.node_ranks()

    def fetch() -> int:
        # params' and buffers' files of this node's ranks; the source decides what that
        # means the node brings in
        files = sorted({f for r in node_ranks for f in plan.stage(r).files})
        wanted = source.node_files(files)
        sizes = {f: plan.file_sizes[f] for f in wanted if f in plan.file_sizes}
        fetched = source.fetch(wanted, sizes=sizes) if wanted else 0
        if fetched:
            logger.info("fetched %.1f MB of %s on this node (%d rank(s))", fetched / 1e6, plan.label,
                        len(node_ranks))
        if verify_checksums:
            source.verify(files)
        return fetched

    fetched = on_node_leaders(world, fetch, what=f"fetching {plan.label}", timeout_s=timeout_s)
    return source.root(), fetched or 0


def on_node_leaders(world: World, fn: Callable[[], T], *, what: str, timeout_s: float) -> T | None:
    """Each node's leader runs `fn`; every rank returns once all leaders are done (the
    leaders with `fn`'s result, the others with None), or raises the first failed
    leader's error. Waits on the job's store: no limit while the leaders live (see the
    module doc); a leader silent for `timeout_s` fails every rank."""
    if not world.distributed:
        return fn()
    token = run_on_rank0(world, lambda: uuid.uuid4().hex[:16], what=what)
    keys = _Keys(job_key(token, "leaders"), sorted(set(world.nodes)))
    store = job_store()
    result, error = None, None
    if world.is_node_leader:
        beat = _Heartbeat(store, keys.alive(world.node))
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - every rank learns of it below
            error = exc
        finally:
            beat.stop()
        record = None if error is None else (world.rank, type(error).__name__, str(error))
        store.set(keys.status(world.node), pickle.dumps(record))
        if store.add(keys.finished, 1) == len(keys.nodes):  # the last leader sums up for all
            records = [pickle.loads(store.get(keys.status(n))) for n in keys.nodes]
            store.set(keys.done, pickle.dumps(next((r for r in records if r is not None), None)))
    failed = pickle.loads(_wait(store, keys, world, what=what, timeout_s=timeout_s))
    if store.add(keys.read, 1) == world.world_size:  # the last reader clears the keys
        for key in keys.all():
            store.delete_key(key)
    if failed is None:
        return result
    if error is not None:
        raise error
    rank, kind, message = failed
    raise RankError(f"rank {rank} (the leader of node {world.nodes[rank]}, {world.hosts[rank]}) failed "
                    f"{what}: {kind}: {message}")


class _Keys:
    def __init__(self, prefix: str, nodes: list[int]) -> None:
        self.prefix, self.nodes = prefix, nodes
        self.finished, self.done, self.read = f"{prefix}/finished", f"{prefix}/done", f"{prefix}/read"

    def status(self, node: int) -> str:
        return f"{self.prefix}/status/{node}"

    def alive(self, node: int) -> str:
        return f"{self.prefix}/alive/{node}"

    def all(self) -> list[str]:
        return [self.finished, self.done, self.read, *(self.status(n) for n in self.nodes),
                *(self.alive(n) for n in self.nodes)]


class _Heartbeat:
    """Bumps `key` in the store every `HEARTBEAT_S` seconds from a thread, until stopped."""

    def __init__(self, store, key: str) -> None:
        self._store, self._key, self._stop = store, key, threading.Event()
        store.add(key, 1)
        self._thread = threading.Thread(target=self._run, name="distload-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._store.add(self._key, 1)
            except Exception:  # noqa: BLE001 - the store is gone: the waiters learn of it themselves
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _wait(store, keys: _Keys, world: World, *, what: str, timeout_s: float) -> bytes:
    """The `done` record, waiting in chunks; between chunks, every leader not yet finished
    must have bumped its heartbeat within `timeout_s`."""
    # Polled, not a blocking store wait: a signal's handler runs only between Python
    # calls, and a timed-out store wait logs a C++ warning each time.
    look = max(1.0, min(10.0, timeout_s / 4))
    seen: dict[int, tuple[int, float]] = {}  # node -> (heartbeat count, when it last changed)
    while True:
        deadline = time.monotonic() + look
        try:
            while time.monotonic() < deadline:
                if store.check([keys.done]):
                    return store.get(keys.done)
                time.sleep(STORE_POLL_S)
        except dist.DistNetworkError as exc:
            raise RankError(f"lost the job's store while {what}: the launcher or a rank is gone "
                            f"({exc})") from exc
        now = time.monotonic()
        for node in keys.nodes:
            if store.check([keys.status(node)]):
                continue
            count = store.add(keys.alive(node), 0)
            last = seen.get(node)
            if last is None or last[0] != count:
                seen[node] = (count, now)
            elif now - last[1] > timeout_s:
                leader = min(world.node_ranks(node))
                raise RankError(f"rank {leader} (the leader of node {node}, {world.hosts[leader]}) has not "
                                f"been heard of for {timeout_s:.0f} s while {what}: it died or hangs")
