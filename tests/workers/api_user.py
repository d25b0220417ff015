"""A user's script of distload's Python API, as README shows it, run under torchrun (or as
plain ranks): nothing in it calls distload's internals or shuts anything down. Each rank
prints one line per step ("rank R ..."), so a test sees every rank's path.

    api_user.py faults GOOD BAD...   every BAD load fails with a distload error on every
                                     rank and is caught; then GOOD loads (in a `with`
                                     block) and generates, loads again, and the script
                                     ends
    api_user.py own_error GOOD       a good load and a generation, then the last rank
                                     raises its own ValueError (the others end normally)
    api_user.py rank_dies GOOD       rank 1 dies while it reads its stage; every other
                                     rank catches the error and exits with status 3

A BAD argument is a checkpoint path, or ``tiny-memory:PATH`` (PATH with a max_memory too
small to hold it: the plan is refused).
"""

import os
import sys

import torch

import distload

rank = int(os.environ.get("RANK", "0"))
last = int(os.environ.get("WORLD_SIZE", "1")) - 1
scenario, good, bad = sys.argv[1], sys.argv[2], sys.argv[3:]
prompt = torch.tensor([[1, 15, 27, 300 % 256]])


def say(text: str) -> None:
    # buffered (the test runs it with PYTHONUNBUFFERED off): written at exit, as one block
    # per rank, and with no GIL let go of between the last collective and the exit
    print(f"rank {rank} {text}")


if scenario == "faults":
    for model in bad:
        memory = None
        if model.startswith("tiny-memory:"):
            model, memory = model.split(":", 1)[1], {"cpu": "1KB"}
        try:
            distload.load(model, device="cpu", max_memory=memory)
            say("loaded a bad checkpoint")
        except distload.DistloadError as exc:
            say(f"caught {type(exc).__name__}")
    with distload.load(good, device="cpu") as pipe:
        tokens = pipe.generate(prompt, max_new_tokens=3)
        if rank == 0:
            say(f"generated {tokens.shape[1] - prompt.shape[1]} tokens")
    # the script ends right after a load's last collective: where the abort was most likely
    pipe = distload.load(good, device="cpu")
    say(f"read {pipe.report['bytes_read']} of {pipe.job_report['checkpoint_bytes']}")
elif scenario == "own_error":
    pipe = distload.load(good, device="cpu")
    pipe.generate(prompt, max_new_tokens=3)
    say("generated")
    if rank == last:
        raise ValueError("the script's own error")
elif scenario == "rank_dies":
    if rank == 1:
        import distload.loader.stage as stage

        def die(*args, **kwargs):
            os._exit(9)   # a crash: no Python teardown, no message

        stage.read_stage = die
    try:
        distload.load(good, device="cpu")
    except distload.DistloadError as exc:
        say(f"caught {type(exc).__name__}: {exc}")
        sys.exit(3)
else:
    raise SystemExit(f"unknown scenario {scenario}")
say("ends")
