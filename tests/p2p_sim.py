"""A replay of recorded point-to-point operations as eager NCCL runs them.

With the process group bound to a device (`init_process_group(device_id=...)`), NCCL runs
each rank's unbatched sends and receives of one group on one stream, in the order they
were posted (PyTorch: "unbatched P2P ops are treated as independent collective ops, and
are thus serialized"): a rank's operation on a group starts only once its earlier ones on
that group are done, and a send and its receive complete together. A rank's host posts its
operations in order and stops at each wait until that operation is done. gloo has no such
stream, so a schedule that deadlocks on NCCL passes every gloo test; replaying a gloo run's
record here shows the deadlock.

Events per rank, in host order: ``["send"|"recv", op, group, peer, shape, dtype]`` (posted)
and ``["wait", op]`` (the host blocks until `op` is done).
"""

from __future__ import annotations

from collections import deque

__all__ = ["replay"]


def replay(ranks: list[list[list]]) -> str | None:
    """None when every rank's record runs to its end; else what is stuck, per rank."""
    n = len(ranks)
    pc, queues, done = [0] * n, {}, set()
    progress = True
    while progress:
        progress = False
        for r, events in enumerate(ranks):  # each host posts until it must wait
            while pc[r] < len(events):
                ev = events[pc[r]]
                if ev[0] == "wait":
                    if (r, ev[1]) not in done:
                        break
                else:
                    queues.setdefault((r, ev[2]), deque()).append(ev)
                pc[r] += 1
                progress = True
        for (r, group), queue in list(queues.items()):  # match the heads of the streams
            if not queue or queue[0][0] != "send":
                continue
            send, peer = queue[0], queue[0][3]
            other = queues.get((peer, group))
            if other and other[0][0] == "recv" and other[0][3] == r:
                recv = other[0]
                if (send[4], send[5]) != (recv[4], recv[5]):
                    return (f"rank {r} sends {send[4]} {send[5]} to rank {peer} on {group}, "
                            f"which receives {recv[4]} {recv[5]}")
                queue.popleft(), other.popleft()
                done.update({(r, send[1]), (peer, recv[1])})
                progress = True
    stuck = [f"rank {r}: host at event {pc[r]}/{len(ranks[r])}; stream heads "
             + ", ".join(f"{g}: {q[0][0]} {'to' if q[0][0] == 'send' else 'from'} {q[0][3]}"
                         for (rr, g), q in queues.items() if rr == r and q)
             for r in range(n)
             if pc[r] < len(ranks[r]) or any(q for (rr, _), q in queues.items() if rr == r)]
    return "; ".join(stuck) or None
