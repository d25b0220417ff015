"""The schedules a `Pipeline` can run, by name. The name is what rank 0 announces at the
start of a call (`distload.pipeline.calls`), what the other ranks expect, and what
`Pipeline.serve` follows; a new schedule is a new file that registers itself and one
import line in `schedules/__init__.py`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Schedule", "register_schedule", "get_schedule", "schedule_names"]


@dataclass(frozen=True)
class Schedule:
    """`run(pipe, *args, **kwargs)`: every rank (rank 0 announces and leads, the others
    check the announcement and follow; rank 0's result, None elsewhere). `follow(pipe)`:
    a rank other than 0 whose `serve()` already took rank 0's announcement of `name`."""

    name: str
    run: Callable[..., Any]
    follow: Callable[[Any], None]


_SCHEDULES: dict[str, Schedule] = {}


def register_schedule(schedule: Schedule) -> Schedule:
    if schedule.name in _SCHEDULES:
        raise ValueError(f"schedule {schedule.name!r} is registered twice")
    _SCHEDULES[schedule.name] = schedule
    return schedule


def get_schedule(name: str) -> Schedule:
    """The schedule called `name`; an unknown name (another distload version on rank 0?)
    raises ValueError listing the known ones."""
    try:
        return _SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown pipeline schedule {name!r} (known: {', '.join(_SCHEDULES)}); "
                         "do all ranks run the same distload version?") from None


def schedule_names() -> tuple[str, ...]:
    return tuple(_SCHEDULES)
