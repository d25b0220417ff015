"""Process-group setup, plan broadcast and error propagation.

Every function here is called by every rank, in the same order. Control messages (plans,
errors, reports) go over a gloo group even when tensors use nccl, so they never need a
GPU. An error on one rank is turned into an error on every rank at the next `agree`
point; a rank that dies is caught by torchrun (it stops the others) or by the group's
timeout, so nothing waits forever.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .checkpoint.files import byte_view
from .errors import RankError, UsageError
from .log import logger

__all__ = ["World", "init_world", "run_on_rank0", "agree", "agree_on_arguments", "gather_objects",
           "shutdown", "watch_peers", "peers_gone", "group_timeout_s", "lost_peer", "note_leaving",
           "dead_peers", "job_store", "job_key", "DEFAULT_TIMEOUT_S", "STORE_POLL_S", "STORE_HEARTBEAT_S"]

T = TypeVar("T")
# The one default of every wait between processes that has no better bound: the process
# groups' timeout, a call's waits, a silent node leader, another process's file lock.
DEFAULT_TIMEOUT_S = 600.0
# The job's store protocols (`job_store`): the longest pause between two looks at a key
# another rank sets (a wait ends at most this late), and how often a rank busy for long
# shows it lives by bumping a key of its own.
STORE_POLL_S = 0.25
STORE_HEARTBEAT_S = 2.0

# Process groups made here beside the default one, by purpose ("cpu", "return"). Held here
# only, never in `World` (which users keep through their pipeline): a gloo group's worker
# threads stop only once nothing references it, and one still running at interpreter exit
# aborts the process (see `_leave_at_exit`).
_GROUPS: dict[str, Any] = {}
_EXIT_HOOK: list[bool] = []   # `_leave_at_exit` registered
# Each rank's (host, pid), from init_world: which rank died, when a connection is lost.
_PEERS: list[tuple[str, int]] = []
# The process groups' timeout, from init_world: a host wait on a device-side transfer
# (`pipeline.comm`) gives up before NCCL's watchdog aborts the process.
_TIMEOUT_S: list[float] = [DEFAULT_TIMEOUT_S]


def group_timeout_s() -> float:
    """The timeout (seconds) the job's process groups were made with."""
    return _TIMEOUT_S[0]


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None          # None: a single process without a process group
    hosts: tuple[str, ...] = ()  # each rank's host name, in rank order
    nodes: tuple[int, ...] = ()  # each rank's node (0..), in rank order: ranks of one node share it

    @property
    def node(self) -> int:
        """This rank's node (ranks on one node share its files, its RAM, its offload dir)."""
        return self.nodes[self.rank] if self.nodes else 0

    @property
    def is_node_leader(self) -> bool:
        """The lowest rank of its node: it fetches the node's files while the others wait."""
        return self.rank == min(r for r, n in enumerate(self.nodes) if n == self.node) \
            if self.nodes else True

    def node_ranks(self, node: int | None = None) -> tuple[int, ...]:
        """The ranks on `node` (default: this rank's)."""
        node = self.node if node is None else node
        return tuple(r for r, n in enumerate(self.nodes) if n == node) if self.nodes else (self.rank,)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def cpu_group(self) -> Any:
        """The gloo group for control messages; None: the default group (itself gloo)."""
        return _GROUPS.get("cpu")

    @property
    def return_group(self) -> Any:
        """The group that carries results from the last rank back to rank 0. A group of
        its own because NCCL runs a pair's sends and receives on one stream in order: at
        two ranks, a result coming back would queue behind the next activations going out
        (and wait for them forever)."""
        return _GROUPS.get("return")


def init_world(*, timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None) -> World:
    """Join the job that torchrun started (env RANK, WORLD_SIZE, LOCAL_RANK), or make a
    world of one when those are absent. The device is `cuda:LOCAL_RANK` when CUDA is
    available, else the CPU; `device` overrides ("cpu" forces gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)  # only this rank's GPU: no contexts on the others
    if world_size == 1 and not dist.is_initialized():
        return World(0, 1, 0, dev, None, hosts=(socket.gethostname(),), nodes=(0,))
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    _TIMEOUT_S[0] = timeout_s
    if not dist.is_initialized():
        # Bound to the device, NCCL starts at once (the tied-weight exchange's batched P2P
        # is then not the group's first NCCL op, which every rank would have to join); it
        # also runs each rank's unbatched sends and receives of a group on one stream in
        # post order, so the schedules post a step's sends before the next receive.
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    if not _EXIT_HOOK:
        atexit.register(_leave_at_exit)
        _EXIT_HOOK.append(True)
    backend = dist.get_backend()
    # every rank runs init_world equally often, so all make these groups alike. With gloo
    # the default group carries control messages too.
    if backend != "gloo" and "cpu" not in _GROUPS:
        _GROUPS["cpu"] = dist.new_group(backend="gloo", timeout=timeout)
    if "return" not in _GROUPS:
        _GROUPS["return"] = dist.new_group(backend=backend, timeout=timeout)
    if backend == "nccl":
        with watch_peers("opening the links between the GPU ranks"):
            _open_links(dist.get_rank(), dist.get_world_size(), dev)
    cpu_group = _GROUPS.get("cpu")
    # A node is a host; torchrun's GROUP_RANK (the node rank) tells apart "nodes" that share
    # a host name (containers, or several launches on one machine).
    here = (socket.gethostname(), os.environ.get("GROUP_RANK", ""), os.getpid())
    with watch_peers("starting the job"):
        everyone = _all_gather_pickled(here, cpu_group)
    _PEERS[:] = [(host, pid) for host, _, pid in everyone]
    node_keys = [(host, group) for host, group, _ in everyone]
    first_seen = {key: i for i, key in reversed(list(enumerate(node_keys)))}
    order = sorted(set(first_seen.values()))
    nodes = tuple(order.index(first_seen[key]) for key in node_keys)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend,
                 hosts=tuple(host for host, _, _ in everyone), nodes=nodes)


def _link_ops(rank: int, world_size: int) -> list[tuple[str, int, str]]:
    """(send|recv, peer, group) in post order: a ring over the default group (each rank to
    the next, the last to rank 0: the pipeline's links and the usual tied exchange) and
    the last rank to rank 0 over the return group. Rank 0 sends first, the others receive
    first, so each group's ops complete in post order as eager NCCL runs them."""
    if world_size < 2:
        return []
    nxt, prev = (rank + 1) % world_size, (rank - 1) % world_size
    ring = [("send", nxt, "default"), ("recv", prev, "default")] if rank == 0 else \
        [("recv", prev, "default"), ("send", nxt, "default")]
    if rank == world_size - 1:
        return ring + [("send", 0, "return")]
    return ring + ([("recv", world_size - 1, "return")] if rank == 0 else [])


def _open_links(rank: int, world_size: int, device: torch.device) -> None:
    """One tiny message over each link the job uses (`_link_ops`), before anything
    measures the GPU's free memory: NCCL allocates a link's buffers on its first use,
    which would otherwise come after the planner counted that memory as free."""
    groups = {"default": None, "return": _GROUPS.get("return")}
    works = []
    for kind, peer, group in _link_ops(rank, world_size):
        op = dist.isend if kind == "send" else dist.irecv
        works.append(op(torch.zeros(1, device=device), peer, group=groups[group]))
    for work in works:
        work.wait()
    torch.cuda.synchronize(device)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:   # a killed child not yet reaped is a zombie
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _dead_ranks() -> list[int]:
    """The ranks on this host whose process is gone (a peer's connection closes as it dies,
    so allow it a moment to be seen dead)."""
    deadline = time.monotonic() + 1.0
    while True:
        dead = peers_gone(range(len(_PEERS)))
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)


def peers_gone(ranks) -> list[int]:
    """Of `ranks`, those on this host whose process is gone, at once: a rank that waits on
    the job's store (`distload.loader.waits`) rather than in a collective learns here that a
    peer died."""
    host = socket.gethostname()
    return [r for r in ranks if r < len(_PEERS) and _PEERS[r][0] == host and not _alive(_PEERS[r][1])]


@contextlib.contextmanager
def watch_peers(what: str) -> Iterator[None]:
    """Turn a lost connection or a timeout in a collective into a `RankError` that says
    which rank died, or that the others did not answer, and during what."""
    try:
        yield
    except RuntimeError as exc:  # gloo/nccl errors (DistBackendError is one)
        raise lost_peer(exc, what) from exc


def lost_peer(exc: BaseException, what: str, *, peer: int | None = None) -> RankError:
    """The `RankError` for a transport error `exc` during `what`: the rank(s) whose
    process is gone, where one on this host is; else `peer` (the rank this one talked
    to), or that the others did not answer. The backend's own text (gloo's file and line)
    goes to the debug log only."""
    logger.debug("%s: %s", what, exc)
    text = str(exc).strip()
    gone = _dead_ranks()
    notes = _notes(gone) or {}
    dead = [r for r in gone if r not in notes]   # gone without saying why: killed, crashed
    if dead:
        return RankError(f"rank {', '.join(map(str, dead))} died (connection lost) during {what}")
    if notes:   # gone after an error of its own, which it left for the others
        r, (cause, line) = next(iter(notes.items()))
        return RankError(f"rank {r} stopped: {line}", cause=cause)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return RankError(f"another rank did not answer in time during {what}")
    who = f"rank {peer}" if peer is not None else "another rank"
    return RankError(f"lost the connection to {who} during {what}: it died or stopped")


def job_store() -> dist.Store:
    """The job's key-value store: the one every rank joined the job with (the TCPStore
    torchrun set up), which every store protocol of distload shares — each node leader's
    fetch (`distload.loader.fetch`), the load's board (`distload.loader.board`), the call
    announcements (`distload.pipeline.calls`) and the notes of ranks that leave. Unlike a
    collective, a wait on it is bounded by its caller, never by the process group's
    timeout. Any rank, once `init_world` made the process group; `RuntimeError` before.

    Example::

        store = job_store()
        store.set(job_key(token, "ready"), "1")      # every rank finds the same key
    """
    if not dist.is_initialized():
        raise RuntimeError("the job's store exists only once the process group is made (init_world)")
    # torch has no public getter for it: this is distload's one use of the private name
    return dist.distributed_c10d._get_default_store()


def job_key(*parts: object) -> str:
    """A key of distload's in the job's store: ``distload/<part>/<part>...`` (a protocol
    makes its parts unique per job, e.g. with a token rank 0 drew, so that keys left in
    a long-lived store by an earlier job never match)."""
    return "/".join(("distload", *map(str, parts)))


_NOTE = job_key("left", "{}")


def note_leaving(reason: str, cause: str | None = None) -> None:
    """This rank is about to exit after an error (`reason`, its one line; `cause`, the
    error's kind as `RankError.cause` names it): say so on the job's store, so that a peer
    that finds it gone does not take it for the rank that died, and exits as it does
    (`lost_peer`). Best effort: the store may be gone too."""
    if not dist.is_initialized():
        return
    try:
        note = pickle.dumps((cause, reason))
        job_store().set(_NOTE.format(dist.get_rank()), note)
    except Exception as exc:  # noqa: BLE001 - leaving anyway
        logger.debug("could not leave a note on the job's store: %s", exc)


def dead_peers() -> list[int]:
    """At once: the ranks on this host whose process is gone without a note (killed or
    crashed, not stopped by an error of their own or a signal it reported). Empty when
    the notes cannot be read (the store's host left): then nobody can tell."""
    gone = peers_gone(range(len(_PEERS)))
    notes = _notes(gone)
    return [] if notes is None else [r for r in gone if r not in notes]


def _notes(ranks: list[int]) -> dict[int, tuple[str | None, str]] | None:
    """(cause, line) of each of `ranks` that left a note (`note_leaving`); None when the
    job's store cannot be read."""
    out: dict[int, tuple[str | None, str]] = {}
    if not ranks or not dist.is_initialized():
        return out
    try:
        store = job_store()
        for r in ranks:
            if store.check([_NOTE.format(r)]):
                out[r] = pickle.loads(store.get(_NOTE.format(r)))
    except Exception as exc:  # noqa: BLE001 - no store
        logger.debug("could not read the job's store: %s", exc)
        return None
    return out


def _error_record(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc))}


def run_on_rank0(world: World, fn: Callable[[], T] | None, *, what: str = "rank 0's step") -> T:
    """Rank 0 runs `fn` (the others may pass None); every rank gets its result, or raises
    its error.

    On rank 0 the original exception propagates; elsewhere a `RankError` carries it.
    `what` names the step in the error of a rank whose peer died.
    """
    if not world.distributed:
        return fn()
    box: Any = None
    error: BaseException | None = None
    if world.is_first:
        try:
            box = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - forwarded to every rank
            error = exc
            box = ("error", _error_record(exc))
    with watch_peers(what):
        status, payload = _broadcast_pickled(box, world.cpu_group)
    if status == "ok":
        return payload
    if error is not None:
        raise error
    raise RankError(f"rank 0 failed: {payload['type']}: {payload['message']}", cause=payload["type"])


def agree(world: World, error: BaseException | None, *, what: str = "loading") -> None:
    """Every rank says whether it succeeded; if any failed, every rank raises.

    A rank's own exception is re-raised as is; the others raise `RankError` naming the
    first failed rank and its message. A rank that died is named (`what` says during what).
    When every rank failed with the same error, the exception of each rank but 0 carries
    ``rank0_speaks = True``: a job-wide error, for rank 0 alone to report.
    """
    if not world.distributed:
        if error is not None:
            raise error
        return
    records = gather_objects(world, None if error is None else _error_record(error), what=what)
    failed = [(r, rec) for r, rec in enumerate(records) if rec is not None]
    if not failed:
        return
    if error is not None:
        # the same error on every rank (a typo in the model's path) is the job's: rank 0
        # speaks for it, the others may stay quiet (`rank0_speaks`, read by the CLI)
        same = [(rec["type"], rec["message"]) for _, rec in failed]
        if world.rank != 0 and len(failed) == world.world_size and len(set(same)) == 1:
            error.rank0_speaks = True
        raise error
    r, rec = failed[0]
    raise RankError(f"rank {r} failed: {rec['type']}: {rec['message']}", cause=rec["type"])


def agree_on_arguments(world: World, arguments: dict[str, Any]) -> None:
    """Every rank, at the start: raise `UsageError` on every rank when any rank's
    `arguments` (name -> value; include the versions that must match) differ from rank
    0's, naming each difference. A job whose ranks were launched with different flags
    would otherwise run rank 0's model silently, or hang on mismatched messages."""
    if not world.distributed:
        return
    mine = {name: repr(value) for name, value in arguments.items()}
    everyone = gather_objects(world, mine, what="checking the ranks' arguments")
    first = everyone[0]
    differences = [f"rank {r} has {name} {theirs.get(name, '(none)')} but rank 0 has "
                   f"{first.get(name, '(none)')}"
                   for r, theirs in enumerate(everyone) if r
                   for name in sorted(set(first) | set(theirs)) if first.get(name) != theirs.get(name)]
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise UsageError(f"the ranks were started with different arguments: {shown}")


def gather_objects(world: World, obj: Any, *, what: str = "exchanging control messages") -> list[Any]:
    """All-gather one picklable object per rank (in rank order) over the control group."""
    if not world.distributed:
        return [obj]
    with watch_peers(what):
        return _all_gather_pickled(obj, world.cpu_group)


# torch's *_object collectives turn bytes back into objects through numpy, which is not a
# dependency of distload; these do the same with byte views of CPU tensors.

def _unpickle(t: torch.Tensor) -> Any:
    return pickle.loads(bytes(byte_view(t)))


def _all_gather_pickled(obj: Any, group: Any) -> list[Any]:
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([data.numel()]), group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return [_unpickle(p[:int(n)]) for p, n in zip(parts, sizes)]


def _broadcast_pickled(obj: Any, group: Any) -> Any:
    """Rank 0's `obj` on every rank (the others pass anything)."""
    first = dist.get_rank() == 0
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if first else None
    size = torch.tensor([data.numel() if first else 0])
    dist.broadcast(size, src=0, group=group)
    buffer = data if first else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buffer, src=0, group=group)
    return obj if first else _unpickle(buffer)


def shutdown(world: World | None = None, *, failed: bool = False) -> None:
    """Leave the process group (if any), every group distload made with it. After a
    failure, leave without waiting for peers, which may be gone."""
    if not dist.is_initialized():
        _GROUPS.clear()
        return
    try:
        if not failed and world is not None:
            dist.barrier(group=world.cpu_group)
    except Exception as exc:  # noqa: BLE001 - best effort at exit
        logger.debug("process group shutdown: %s", exc)
    _GROUPS.clear()
    try:
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - best effort at exit
        logger.debug("process group shutdown: %s", exc)


def _leave_at_exit() -> None:
    """At interpreter exit (an atexit hook, so before Python tears itself down): destroy
    the process groups, which joins their worker threads.

    Why: a gloo worker thread lets go of a finished collective's tensors after the caller
    has its result; dropping a tensor that Python also references takes the GIL. A script
    that ends right after a collective (a `load`, a call, an error) reaches interpreter
    finalization first; the thread then cannot take the GIL, is unwound, and the process
    aborts ("terminate called without an active exception", SIGABRT). Joined here, the
    threads finish while the interpreter still runs. No barrier: a peer may be gone, or
    still busy; nothing of this rank's is pending by now. (A job is joined once per
    process: torch cannot join it again after leaving.)"""
    shutdown(failed=True)
