"""One progress bar for the whole load, on rank 0, fed by every rank's reader.

Each rank's `RankProgress` is its reader's ``progress(file, nbytes)`` callback (see
`distload.io.reader`): it counts the bytes and, at most every 0.2 s (and at each phase
change), writes the rank's state to the job's board (`distload.loader.board`: one store
round trip, never a collective). Rank 0's `ProgressMonitor` thread reads every rank's
state at once every 0.5 s and shows the job's bytes read over all ranks, the rate and the
time left: a tqdm bar on stderr when stderr is a terminal, else a log line every
``DISTLOAD_PROGRESS_SECONDS`` (10) seconds. A rank that reads nothing for
``DISTLOAD_STALL_SECONDS`` (60) while it should be reading is named, with its stage and
file. ``DISTLOAD_PROGRESS=0`` turns the reporting off (the board still serves the waits).

Example (every rank; rank 0 also runs the monitor)::

    board = JobBoard.open(world, plan)
    mine = RankProgress(board, plan, world.rank, root=root)
    with ProgressMonitor.maybe(board, plan, world):
        mine.phase("reading")
        reader.read(reads, storage, progress=mine)
        mine.phase("done")
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

from ..dist import STORE_HEARTBEAT_S
from ..log import logger
from ..plan.explain import short_units
from .board import JobBoard

__all__ = ["RankProgress", "ProgressMonitor", "stage_label", "progress_enabled"]

PUSH_SECONDS = 0.2      # a rank writes its state at most this often
HEARTBEAT_SECONDS = STORE_HEARTBEAT_S  # ... and at least this often while it loads (`RankProgress.beating`)
POLL_SECONDS = 0.5      # rank 0 reads every rank's state this often
BAR_DELAY_SECONDS = 1.0  # no bar for a load quicker than this
# phases in which a rank that reads nothing is stalled (in the others it waits, or writes)
_ACTIVE = ("starting", "reading")


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def progress_enabled() -> bool:
    return os.environ.get("DISTLOAD_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def stage_label(plan, rank: int) -> str:
    """``layers.40-47, norm, lm_head``: a stage's units for people (`short_units`)."""
    return short_units(plan.stage(rank).units)


class RankProgress:
    """This rank's reading, as the reader's ``progress(file, nbytes)`` callback (called
    from reader threads) and its `phase` changes, written to the board. Files are named
    relative to the checkpoint's `root`."""

    def __init__(self, board: JobBoard, plan, rank: int, *, root: str = "") -> None:
        self.board, self.rank = board, rank
        self.total = plan.stage(rank).tensor_bytes
        self.root = root.rstrip(os.sep) + os.sep if root else ""
        self.bytes, self.file, self._phase = 0, "", "starting"
        self._pushed, self._beat = 0.0, 0
        self._lock = threading.Lock()

    def __call__(self, file: str, nbytes: int) -> None:
        with self._lock:
            self.bytes += nbytes
            name = file[len(self.root):] if self.root and file.startswith(self.root) else file
            now = time.monotonic()
            if name != self.file or now - self._pushed >= PUSH_SECONDS:
                self.file = name
                self._push(now)

    def phase(self, name: str) -> None:
        """Enter phase `name` (``reading``, ``waiting``, ``offloading``, ``done``, ...);
        written at once."""
        with self._lock:
            self._phase = name
            self._push(time.monotonic())

    def flush(self) -> None:
        """Write the state now (the reader's calls write it at most every 0.2 s)."""
        with self._lock:
            self._push(time.monotonic())

    @contextlib.contextmanager
    def beating(self) -> Iterator[None]:
        """Within it, a thread writes the state every `HEARTBEAT_SECONDS` even when nothing
        moves (a long read, a wait): its ``beat`` count tells rank 0 this rank is alive."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    self.flush()
                except Exception:  # noqa: BLE001 - the store went with the job: nothing to tell
                    return

        thread = threading.Thread(target=run, name="distload-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def state(self) -> dict:
        return {"phase": self._phase, "bytes": self.bytes, "total": self.total, "file": self.file,
                "t": time.time(), "beat": self._beat}

    def _push(self, now: float) -> None:
        self._pushed, self._beat = now, self._beat + 1
        self.board.set_state(self.rank, self.state())


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class ProgressMonitor:
    """Rank 0's view of the job's load (see the module doc): a daemon thread from
    `start` to `stop`."""

    def __init__(self, board: JobBoard, plan, *, stream=None, interval_s: float | None = None,
                 stall_s: float | None = None, poll_s: float = POLL_SECONDS,
                 own_connection: bool = False) -> None:
        # own_connection: the thread reads through a clone of the board (see `JobBoard.clone`),
        # made on the thread, so the load does not wait for the connection
        self.board, self.plan, self._own_connection = board, plan, own_connection
        self.stream = stream or sys.stderr
        self.interval_s = interval_s or _env_float("DISTLOAD_PROGRESS_SECONDS", 10.0)
        self.stall_s = stall_s or _env_float("DISTLOAD_STALL_SECONDS", 60.0)
        self.poll_s = min(poll_s, self.interval_s, self.stall_s / 4)
        self.totals = [s.tensor_bytes for s in plan.stages]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._tty = False
        self.started = self._logged = time.monotonic()
        # per rank: (bytes, phase) last seen, when it changed, stall warnings given since
        self._seen: list[tuple[int, str]] = [(0, "starting")] * len(self.totals)
        self._changed = [self.started] * len(self.totals)
        self._warned = [0] * len(self.totals)

    @classmethod
    @contextlib.contextmanager
    def maybe(cls, board: JobBoard, plan, world) -> Iterator[ProgressMonitor | None]:
        """On rank 0, with reporting on (`progress_enabled`), a running monitor; else None."""
        monitor = cls(board, plan, own_connection=True) if world.is_first and progress_enabled() else None
        if monitor is not None:
            monitor.start()
        try:
            yield monitor
        finally:
            if monitor is not None:
                monitor.stop()

    def start(self) -> None:
        self._tty = getattr(self.stream, "isatty", lambda: False)()
        self.started = self._logged = time.monotonic()
        self._changed = [self.started] * len(self.totals)
        self._thread = threading.Thread(target=self._run, name="distload-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        try:
            if self._own_connection:
                self.board = self.board.clone()
            while not self._stop.wait(self.poll_s):
                self.poll()
        except Exception as exc:  # noqa: BLE001 - the store went with a failed job
            logger.debug("progress: %s", exc)

    def poll(self, now: float | None = None) -> None:
        """Read every rank's state once; update the bar or log; name stalled ranks."""
        now = time.monotonic() if now is None else now
        states = self.board.states()
        done = 0
        for r, state in enumerate(states):
            seen = (int(state.get("bytes", 0)), str(state.get("phase", "starting")))
            if seen != self._seen[r]:
                self._seen[r], self._changed[r], self._warned[r] = seen, now, 0
            # a rank past its reading counts whole (bytes it did not read: offload entries reused)
            finished = seen[1] not in _ACTIVE
            done += self.totals[r] if finished else min(seen[0], self.totals[r])
            self._check_stall(r, state, now)
        total = sum(self.totals)
        if self._tty:
            self._show(done, total, now)
        elif now - self._logged >= self.interval_s:
            self._logged = now
            elapsed = now - self.started
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = _duration((total - done) / rate) if rate > 0 else "unknown"
            reading = sum(1 for _, phase in self._seen if phase in _ACTIVE)
            logger.info("loading %s: %s of %s (%.0f%%), %.2f GB/s, ETA %s; %d of %d rank(s) reading",
                        self.plan.label, _gb(done), _gb(total), 100 * done / max(total, 1),
                        rate / 1e9, eta, reading, len(self.totals))

    def _show(self, done: int, total: int, now: float) -> None:
        """The bar, once the load has taken a second (a quick load shows none)."""
        if self._bar is None:
            if now - self.started < BAR_DELAY_SECONDS:
                return
            from tqdm import tqdm

            # the rate is the average since the load began (smoothing=0, start back-dated):
            # ranks report in bursts, and the first second's bytes arrive as one jump
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                             desc=f"loading {self.plan.label}", file=self.stream, leave=False,
                             dynamic_ncols=True, smoothing=0)
            self._bar.start_t -= now - self.started
        self._bar.update(done - self._bar.n)
        self._bar.refresh()   # a stalled load's rate and time left still move

    def _check_stall(self, r: int, state: dict, now: float) -> None:
        idle = now - self._changed[r]
        phase = self._seen[r][1]
        if phase not in _ACTIVE or idle < self.stall_s * (self._warned[r] + 1):
            return
        self._warned[r] += 1
        where = f"; file {state['file']}" if state.get("file") else ""
        message = (f"rank {r} has read nothing for {_duration(idle)} (stage: "
                   f"{stage_label(self.plan, r)}; {phase}{where}; {_gb(self._seen[r][0])} of "
                   f"{_gb(self.totals[r])} read)")
        if self._bar is not None:
            with self._bar.external_write_mode():
                logger.warning("%s", message)
        else:
            logger.warning("%s", message)
