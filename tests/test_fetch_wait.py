"""Waiting for the node leaders on the job's store (distload/loader/fetch.py), with an in-process store:
a leader that keeps its heartbeat is waited for however long it works; a silent one fails the wait within
the timeout, naming it. (The launches in test_hub_nodes.py wait through this with real torchrun jobs.)"""

from __future__ import annotations

import pickle
import threading
import time

import pytest
import torch
import torch.distributed as dist

import distload.loader.fetch as fetch
from distload.dist import World
from distload.errors import RankError

WORLD = World(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), backend="gloo",
              hosts=("a", "b", "b"), nodes=(0, 1, 1))


def keys() -> fetch._Keys:
    return fetch._Keys("distload/test/leaders", [0, 1])


def test_a_working_leader_is_waited_for_longer_than_the_timeout(monkeypatch):
    monkeypatch.setattr(fetch, "HEARTBEAT_S", 0.1)
    store, k = dist.HashStore(), keys()
    store.set(k.status(0), pickle.dumps(None))

    def leader():  # node 1 works for 3 timeouts, beating, then reports its error
        beat = fetch._Heartbeat(store, k.alive(1))
        time.sleep(3.0)
        beat.stop()
        record = (1, "CheckpointError", "x.safetensors: download failed")
        store.set(k.status(1), pickle.dumps(record))
        store.set(k.done, pickle.dumps(record))

    thread = threading.Thread(target=leader)
    start = time.monotonic()
    thread.start()
    done = fetch._wait(store, k, WORLD, what="fetching", timeout_s=1.0)
    thread.join()
    assert time.monotonic() - start >= 3.0
    assert pickle.loads(done) == (1, "CheckpointError", "x.safetensors: download failed")


def test_a_silent_leader_fails_the_wait_naming_it():
    store, k = dist.HashStore(), keys()
    store.set(k.status(0), pickle.dumps(None))      # node 0 is done; node 1's leader never beats
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 \(the leader of node 1, b\) has not been heard of for 1 s "
                                        r"while fetching: it died or hangs"):
        fetch._wait(store, k, WORLD, what="fetching", timeout_s=1.0)
    assert time.monotonic() - start < 5
