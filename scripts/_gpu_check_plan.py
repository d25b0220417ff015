"""One step of `scripts/gpu_check.sh` (not for users): plan each of its models for every
world size from 1 to MAX_RANKS, as rank 0 would with that many ranks like this one (each
measuring what `measure_local` measures here: GPU 0's free memory on a GPU machine, the
host's on CPU ranks). The other steps run one rank per GPU, so a model that cannot be
split that many ways (fewer units than ranks) fails here in seconds, naming the world
size, rather than minutes later in a torchrun. Each model is written to WORK/NAME as
headers over sparse files (`make_checkpoint.py ARGS --headers-only`, in this process: no
interpreter start per model) and planned from them: nothing is read or allocated. Writes
``OUT/plan.json``: per model and world size the units of each rank, or the planner's
error; ``pass`` when every one planned.

    python scripts/_gpu_check_plan.py OUT cpu|cuda MAX_RANKS WORK "NAME=ARGS" ...
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_checkpoint  # noqa: E402 - scripts/make_checkpoint.py

from distload.errors import DistloadError
from distload.loader.memory import measure_local
from distload.loader.prepare import PlanRequest, plan_load


def main() -> int:
    out, device, max_ranks, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    mine = measure_local("cuda:0" if device == "cuda" else "cpu")
    models, ok = {}, True
    for spec in sys.argv[5:]:
        name, _, args = spec.partition("=")
        ckpt = os.path.join(work, name)
        shutil.rmtree(ckpt, ignore_errors=True)
        make_checkpoint.main([ckpt, *shlex.split(args), "--headers-only"])
        rows = {}
        for world in range(1, max_ranks + 1):
            start = time.perf_counter()
            measured = (replace(mine, local_world_size=world),) * world
            try:
                plan = plan_load(PlanRequest(model=ckpt, world_size=world, measured=measured))
                rows[world] = {"units": [len(s.units) for s in plan.stages],
                               "stream_slots": [s.stream_slots for s in plan.stages]}
            except DistloadError as exc:
                rows[world] = {"error": f"{type(exc).__name__}: {exc}"}
                ok = False
            rows[world]["seconds"] = round(time.perf_counter() - start, 3)
            print(f"{name} x{world}: {rows[world]}", flush=True)
        models[name] = rows
    with open(os.path.join(out, "plan.json"), "w") as f:
        json.dump({"device": device, "max_ranks": max_ranks, "models": models, "pass": ok}, f)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
