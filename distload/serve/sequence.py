"""One request's sequence on rank 0: its prompt and limits, the tokens it has generated,
its text so far (stop strings cut it), and the events its HTTP handler waits on.

The scheduler calls `accept` with each new token (in its own thread); the handler reads
`events` (in the server's event loop: `emit` hands each event over thread-safely). A
handler whose client went away calls `cancel`; the scheduler then drops the sequence and
frees its KV cache at its group's next step.

Example::

    seq = Sequence(prompt=[1, 2, 3], max_tokens=4, sampling=SamplingConfig(), stop_ids={2},
                   stop_strings=(), text=ModelText(), emit=print)
    seq.accept(42)   # emits Delta(text, [42]); returns None: not finished
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..pipeline.sampling import SamplingConfig

__all__ = ["Sequence", "Delta", "Done"]


@dataclass(frozen=True)
class Delta:
    """New text (possibly "", held back while it may still become a stop string) and the
    token ids that made it."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Done:
    """The sequence is over: ``stop``, ``length``, or ``abort`` (cancelled, or the server
    stopped) with `error` saying why."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop_ids: frozenset[int] | set[int]
    stop_strings: tuple[str, ...]
    text: object                       # a `ModelText`
    emit: object                       # callable(event), safe to call from any thread
    arrived: float = field(default_factory=time.perf_counter)
    sid: int = -1                      # the scheduler's id for it, once admitted
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    _sent: int = 0      # characters of text already emitted
    _text: str = ""

    @property
    def alive(self) -> bool:
        return self.finish_reason is None and not self.cancelled

    @property
    def last_token(self) -> int:
        return self.output[-1]

    def cancel(self) -> None:
        """Any thread: the client is gone; the scheduler drops the sequence."""
        self.cancelled = True

    def accept(self, token: int) -> str | None:
        """Take the next token; emit what is new; return the finish reason once done."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.output.append(token)
        reason = None
        text_ids = self.output
        if token in self.stop_ids:
            reason, text_ids = "stop", self.output[:-1]
        elif len(self.output) >= self.max_tokens:
            reason = "length"
        text = self.text.decode(text_ids)
        if self.stop_strings:
            cut = min((i for i in (text.find(s, max(0, self._sent - len(s))) for s in self.stop_strings)
                       if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        self._text = text
        if reason is None:
            end = len(text)
            if text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest
                end = len(text.rstrip("\ufffd"))
            if self.stop_strings:  # what may yet start a stop string stays back
                end = min(end, len(text) - max(len(s) for s in self.stop_strings) + 1)
            end = max(end, self._sent)
        else:
            end = len(text)
            self.finish_reason = reason
        self.emit(Delta(text[self._sent:end], [token]))
        self._sent = end
        if reason is not None:
            self.emit(Done(reason, len(self.prompt), len(self.output)))
        return reason

    def abort(self, why: str) -> None:
        """The server ends the sequence before it finished (shutdown deadline, failure)."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
            self.emit(Done("abort", len(self.prompt), len(self.output), error=why))

    @property
    def generated_text(self) -> str:
        return self._text
