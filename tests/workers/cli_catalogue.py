"""One rank of a job that runs the CLI (`distload.cli.main.main`) once per case of a
catalogue, each case a job of its own (a fresh process group on the case's port), and
records per case: the exit code the CLI returned, everything this process wrote to its
stderr (file descriptor 2, so C++ output too), and the seconds it took.

    python cli_catalogue.py CASES.json OUT_DIR      # CASES: [{"name", "port", "argv"}, ...]

Started as plain processes, one per rank (tests/mp.py: Ranks), with RANK, WORLD_SIZE and
MASTER_ADDR set; MASTER_PORT is set here, per case.
"""

import json
import os
import sys
import tempfile
import time

from distload.cli.main import main

cases_file, out_dir = sys.argv[1], sys.argv[2]
rank = os.environ["RANK"]
results = {}
for case in json.loads(open(cases_file).read()):
    os.environ["MASTER_PORT"] = str(case["port"])
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        start = time.monotonic()
        try:
            code = main(case["argv"])
        except BaseException as exc:  # noqa: BLE001 - recorded: the test fails on it
            code = f"raised {type(exc).__name__}: {exc}"
        seconds = time.monotonic() - start
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    results[case["name"]] = {"code": code, "stderr": text, "seconds": seconds}
with open(os.path.join(out_dir, f"catalogue{rank}.json"), "w") as f:
    json.dump(results, f)
os._exit(0)
