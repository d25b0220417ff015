"""The CLI (`distload.cli.main.entry`) with a part slowed on purpose, so a test can
interrupt or kill a rank while it loads or generates:

* DISTLOAD_TEST_SLOW_READ=S: every rank's read of its stage (only rank
  DISTLOAD_TEST_SLOW_RANK's, when set) takes S more seconds, after it logs "reading (slowed)";
* DISTLOAD_TEST_SLOW_STEP=S: each decode step of a generation takes S more seconds on
  every rank, after rank 0 logs "generating (slowed)" once;
* DISTLOAD_TEST_SLOW_WRITE=S: writing each offload entry's bytes takes S more seconds,
  half-way through (its temporary file is open), after a rank logs "writing (slowed)" once;
* DISTLOAD_TEST_FAIL_REPORT=1: writing the report's JSON fails as on a full disk;
* DISTLOAD_TEST_SLOW_START=S: rank DISTLOAD_TEST_SLOW_RANK (every rank, when unset)
  starts S seconds late, as a rank whose imports are slow;
* DISTLOAD_TEST_EXIT_DIR=D: each rank writes its process id to D/pid<RANK> as it starts
  and its exit code to D/rank<RANK> before it leaves (under torchrun, which does not say
  its workers' codes when it is signalled).
"""

import os
import sys
import time

import distload.cli.table as table
import distload.loader.stage as stage
import distload.offload.store as store
from distload.cli.exits import leave
from distload.cli.main import main
from distload.log import logger
from distload.pipeline.schedules import ring_decode

read_delay = float(os.environ.get("DISTLOAD_TEST_SLOW_READ", "0"))
if os.environ.get("DISTLOAD_TEST_SLOW_RANK", os.environ["RANK"]) != os.environ["RANK"]:
    read_delay = 0.0
step_delay = float(os.environ.get("DISTLOAD_TEST_SLOW_STEP", "0"))

if read_delay:
    real_read = stage.read_stage

    def slow_read(*args, **kw):
        logger.warning("reading (slowed)")
        time.sleep(read_delay)
        return real_read(*args, **kw)

    stage.read_stage = slow_read

if step_delay:
    real_step = ring_decode._StageRunner.step
    told = []

    def slow_step(self, *args, **kw):
        if not told:
            told.append(True)
            logger.warning("generating (slowed)")
        time.sleep(step_delay)
        return real_step(self, *args, **kw)

    ring_decode._StageRunner.step = slow_step

write_delay = float(os.environ.get("DISTLOAD_TEST_SLOW_WRITE", "0"))
if write_delay:
    real_write_all = store._write_all
    told_write = []

    def slow_write_all(fd, view):
        if len(view) <= 1024:                    # an entry's header: at full speed
            return real_write_all(fd, view)
        if not told_write:
            told_write.append(True)
            logger.warning("writing (slowed)")
        real_write_all(fd, view[:len(view) // 2])
        time.sleep(write_delay)
        real_write_all(fd, view[len(view) // 2:])

    store._write_all = slow_write_all

if os.environ.get("DISTLOAD_TEST_FAIL_REPORT"):
    def full_disk(*args, **kw):
        raise OSError(28, "No space left on device (injected)")

    table.json.dump = full_disk

if os.environ.get("DISTLOAD_TEST_SLOW_RANK", os.environ["RANK"]) == os.environ["RANK"]:
    time.sleep(float(os.environ.get("DISTLOAD_TEST_SLOW_START", "0")))
if os.environ.get("DISTLOAD_TEST_EXIT_DIR"):
    with open(os.path.join(os.environ["DISTLOAD_TEST_EXIT_DIR"], f"pid{os.environ['RANK']}"), "w") as f:
        f.write(str(os.getpid()))
code = main(sys.argv[1:])           # as distload.cli.main.entry, noting the code first
if os.environ.get("DISTLOAD_TEST_EXIT_DIR"):
    with open(os.path.join(os.environ["DISTLOAD_TEST_EXIT_DIR"], f"rank{os.environ['RANK']}"), "w") as f:
        f.write(str(code))
leave(code)
