"""scripts/bench_pipeline.py --check on hand-built figures: each ratio against its bound
and floor, and the exit status (below a floor measured quietly: 1; below with disturbed
calls only, or an unmeasurable decode: 2, no verdict)."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_pipeline", Path(__file__).resolve().parent.parent / "scripts" / "bench_pipeline.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _run(ratios: dict, *, disturbed: tuple[str, ...] = (), floors=None):
    a = bench._args(["--micro-batches", "4"])
    keys = ["forward_4", "stream_4", "generate_1", f"generate_{a.new_tokens}"]
    times = {role: {k: ([] if k in disturbed else [1.0]) for k in keys}
             for role in ("pipeline", "sequential")}
    fig = {"forward_ratio": {4: ratios["forward"]}, "stream_ratio": {4: ratios["stream"]},
           **{f"{k}_ratio": ratios[k] for k in ("decode", "prefill", "generate")}}
    return bench.check(a, fig, {"times": times}, floors or dict(bench.CHECK_FLOORS))


GOOD = {"forward": 1.55, "stream": 1.9, "decode": 1.8, "prefill": 1.7, "generate": 1.8}


def test_bounds_of_the_default_bench():
    b = bench.bounds(bench._args(["--micro-batches", "4", "8"]))
    # 2 ranks: one call 2*4/5 and 2*8/9; 2 groups of 64 rows, 4 prefill parts each: 2*8/9
    assert b["forward"] == {4: pytest.approx(1.6), 8: pytest.approx(16 / 9)}
    assert b["stream"] == {4: 2.0, 8: 2.0}
    assert (b["decode"], b["generate"], b["prefill"]) == (2.0, 2.0, pytest.approx(16 / 9))


def test_every_ratio_at_its_floor_passes():
    lines, status = _run(GOOD)
    assert status == 0 and len(lines) == 5
    assert lines[0].startswith("check forward x 4") and "1.55 of bound 1.60 = 96.9%" in lines[0]
    assert all(line.endswith(": ok") for line in lines)


def test_a_quiet_figure_below_its_floor_fails_and_outranks_no_verdict():
    lines, status = _run({**GOOD, "forward": 1.40, "decode": 1.2}, disturbed=("generate_1",))
    assert status == 1
    assert lines[0].endswith(": BELOW") and "(floor 91%)" in lines[0]
    assert "disturbed calls only" in lines[2] and lines[2].endswith("no verdict")


def test_below_with_disturbed_calls_only_or_unmeasurable_is_no_verdict():
    assert _run({**GOOD, "stream": 1.5}, disturbed=("stream_4",))[1] == 2
    lines, status = _run({**GOOD, "decode": None})
    assert status == 2 and "not measurable" in lines[2]
    # a floor of 0 asks nothing of an unmeasurable decode
    assert _run({**GOOD, "decode": None}, floors=dict.fromkeys(bench.CHECK_FLOORS, 0.0))[1] == 0


def test_floor_flag():
    a = bench._args(["--floor", "forward=0.5", "--floor", "all=0"])
    assert a.floor == [("forward", 0.5), ("all", 0.0)]
    with pytest.raises(SystemExit):
        bench._args(["--floor", "speed=1"])


def test_stage_balance_of_a_traced_call():
    # 4 micro-batches; stage 1 is 10% slower (1.1 s a micro-batch against 1.0 s): one call
    # at best takes 1.0 + 4 * 1.1 = 5.4 s against 8.4 s of the stages in turn
    rows = [{"busy": 4.0, "call": 6.0, "wait": 2.0}, {"busy": 4.4, "call": 6.0, "wait": 1.6}]
    b = bench.stage_balance(rows, items=4)
    assert b["in_turn"] == pytest.approx(8.4 / 6.0)
    assert b["balance_bound"] == pytest.approx(8.4 / 5.4)   # 8.4 / (2.1 + 3 * 1.1)
    assert b["schedule_efficiency"] == pytest.approx(5.4 / 6.0)
    assert b["imbalance"] == pytest.approx(4.4 / 4.2 - 1)
    # equal stages: the GPipe bound P * M / (M + P - 1)
    even = bench.stage_balance([{"busy": 4.0, "call": 5.0, "wait": 1.0}] * 2, items=4)
    assert even["balance_bound"] == pytest.approx(1.6) and even["schedule_efficiency"] == pytest.approx(1.0)
