"""The one summary table of `scripts/gpu_check.sh` (not for users): reads what its steps
left in RESULTS (steps.tsv, pytest's junit XML, the read sweep's JSON, the load and
pipeline JSONs), prints the table and writes it to RESULTS/summary.txt and
RESULTS/summary.json. Exit status 0 when every check passed.

    python scripts/_gpu_check_report.py RESULTS
"""

from __future__ import annotations

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

GOAL = 0.9   # of the raw read's GB/s (issue 14)


def _json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def steps(results: str) -> dict[str, tuple[int, float]]:
    out = {}
    try:
        with open(os.path.join(results, "steps.tsv")) as f:
            for line in f:
                name, rc, seconds = line.split("\t")
                out[name] = (int(rc), float(seconds))
    except OSError:
        pass
    return out


def tests(results: str) -> list[tuple[str, str, str]]:
    """(check, result, figures) rows of the CUDA tests."""
    try:
        root = ET.parse(os.path.join(results, "cuda-tests.xml")).getroot()
    except (OSError, ET.ParseError):
        return [("cuda tests (pytest -m cuda)", "FAIL", "no junit report: see logs")]
    rows, counts = [], {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for case in root.iter("testcase"):
        if case.find("skipped") is not None:
            result = "SKIP"
        elif case.find("failure") is not None or case.find("error") is not None:
            result = "FAIL"
        else:
            result = "PASS"
        counts[result] += 1
        why = case.find("failure") if case.find("failure") is not None else case.find("error")
        note = (why.get("message") or "")[:70] if why is not None else ""
        rows.append((f"  {case.get('name')}", result, f"{float(case.get('time', 0)):.1f} s {note}".strip()))
    total = "PASS" if counts["FAIL"] == 0 and counts["PASS"] > 0 else "FAIL"
    head = ("cuda tests (pytest -m cuda)", total,
            f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return [head] + rows


def sweep(results: str) -> tuple[list[tuple[str, str, str]], dict]:
    data = _json(os.path.join(results, "read-sweep.json"))
    if not data:
        return [("read sweep (GPU path vs raw read)", "FAIL", "no figures: see logs")], {}
    rows, raw = [], {}
    for mode, configs in data["summary"].items():
        raw_c = configs["raw|1|False"]["median"]
        raw[mode] = raw_c["rank_gbps"]
        staged = sorted((c for c in configs.values() if c["system"] == "staged"),
                        key=lambda c: (c["direct"], c["threads"]))
        best = max(staged, key=lambda c: c["median"]["x_raw"])
        result = "PASS" if best["median"]["x_raw"] >= GOAL and data["bit_exact"] else "FAIL"
        per = "; ".join(f"{c['threads']}t{'+D' if c['direct'] else ''} {c['median']['x_raw']:.2f}x" for c in staged)
        rows.append((f"read sweep {mode} ({data['nproc']} rank(s))", result,
                     f"raw {'/'.join(f'{g:.2f}' for g in raw_c['rank_gbps'])} GB/s per rank; best "
                     f"{'/'.join(f'{g:.2f}' for g in best['median']['rank_gbps'])} GB/s per rank = "
                     f"{best['median']['x_raw']:.2f}x raw ({best['threads']} threads"
                     f"{', O_DIRECT' if best['direct'] else ''}), node {best['median']['gbps']:.2f} GB/s"))
        rows.append(("  x raw by threads (+D: O_DIRECT)", "", per))
    pinned = [r.get("pinned", {}) for r in data.get("ranks", [])]
    peaks = [max((v for k, v in p.items() if "peak" in k and "bytes" in k), default=None) for p in pinned]
    peaks = [p for p in peaks if p is not None]
    rows.append(("  staged read bit-exact; pinned peak", "PASS" if data["bit_exact"] else "FAIL",
                 f"bit-exact {'yes' if data['bit_exact'] else 'NO'}; pinned peak per rank "
                 f"{', '.join(f'{p / 2**20:.0f} MiB' for p in peaks) or 'n/a'}"))
    return rows, raw


def loads(results: str, raw: dict) -> list[tuple[str, str, str]]:
    rows = []
    for label in ("warm", "cold", "cold-direct"):
        ranks = sorted(filter(None, map(_json, glob.glob(os.path.join(results, f"load-{label}-rank*.json")))),
                       key=lambda r: r["rank"])
        if not ranks:
            rows.append((f"load {label}", "FAIL", "no figures: see logs"))
            continue
        mode = "warm" if label == "warm" else "cold"
        ok = all(r["bit_exact"] for r in ranks)
        for r in ranks:
            ref = raw.get(mode, [None] * (r["rank"] + 1))
            ref = ref[r["rank"]] if r["rank"] < len(ref) else None
            ratio = f" = {r['gbps'] / ref:.2f}x raw" if ref and r["gbps"] else ""
            rows.append((f"load {label} rank {r['rank']} ({r['device']})", "PASS" if r["bit_exact"] else "FAIL",
                         f"{r['bytes_read'] / 1e9:.2f} GB in {r['load_seconds']:.2f} s, {r['gbps']:.2f} GB/s"
                         f"{ratio}; staging {(r['staging_bytes'] or 0) / 2**20:.0f} MiB; "
                         f"O_DIRECT files {r['direct_io_files']} (refused {r['direct_io_refused_files']}); "
                         f"{r['checked']} tensors bit-exact: {'yes' if r['bit_exact'] else 'NO ' + str(r['mismatches'])}"))
        node = sum(r["bytes_read"] for r in ranks) / max(r["load_seconds"] for r in ranks) / 1e9
        rows.append((f"  load {label}: node", "PASS" if ok else "FAIL",
                     f"{node:.2f} GB/s over {len(ranks)} rank(s), backend {ranks[0]['backend']}"))
    return rows


def budget(results: str) -> tuple[int | None, dict[str, int], tuple[str, str] | None]:
    """(the whole check's limit, each step's limit, (work directory, its file system))."""
    limit, steps_, work = None, {}, None
    try:
        with open(os.path.join(results, "budget.tsv")) as f:
            for line in f:
                kind, *rest = line.rstrip("\n").split("\t")
                if kind == "limit":
                    limit = int(rest[0])
                elif kind == "step":
                    steps_[rest[0]] = int(rest[1])
                elif kind == "work":
                    work = (rest[0], rest[1])
    except (OSError, ValueError, IndexError):
        pass
    return limit, steps_, work


def plans(results: str) -> list[tuple[str, str, str]]:
    r = _json(os.path.join(results, "plan.json"))
    if not r:
        return [("plans for 1..N ranks", "FAIL", "no result: see logs")]
    rows = []
    for name, worlds in r["models"].items():
        bad = {w: v["error"] for w, v in worlds.items() if "error" in v}
        figures = "; ".join(f"{w}: {'/'.join(map(str, v['units']))}" for w, v in worlds.items()
                            if "units" in v)
        rows.append((f"plan {name} for 1..{r['max_ranks']} {r['device']} ranks", "FAIL" if bad else "PASS",
                     "; ".join(f"{w} ranks: {e[:80]}" for w, e in bad.items()) if bad
                     else f"units per rank {figures}"))
    return rows


def pipeline(results: str) -> list[tuple[str, str, str]]:
    r = _json(os.path.join(results, "pipeline.json"))
    if not r:
        return [("forward + generate vs transformers", "FAIL", "no result: see logs")]
    return [(f"forward + generate vs transformers", "PASS" if r["pass"] else "FAIL",
             f"{r['world_size']} rank(s) on {', '.join(r['devices'])}, backend {r['backend']}; max |logits "
             f"diff| {r['max_abs_diff']:.2e} (atol {r['atol']}); generated tokens equal: {r['tokens_equal']}")]


def main() -> int:
    results = sys.argv[1]
    rows = []
    ran = steps(results)
    limit, limits, work = budget(results)
    sweep_rows, raw = sweep(results) if "read-sweep" in ran else ([], {})
    for name, (rc, seconds) in ran.items():
        rows.append((f"step {name}", "PASS" if rc == 0 else f"FAIL rc={rc}",
                     f"{seconds:.0f} s (limit {limits.get(name, '?')} s)"))
    if "plan" in ran:
        rows += plans(results)
    if "cuda-tests" in ran:
        rows += tests(results)
    rows += sweep_rows
    if any(name.startswith("load-") for name in ran):
        rows += loads(results, raw)
    if "pipeline" in ran:
        rows += pipeline(results)
    if work is not None and any(name in ran for name in ("read-sweep", "load-cold", "load-cold-direct")):
        in_ram = work[1] in ("tmpfs", "ramfs")
        rows.append(("cold reads from a disk", "FAIL" if in_ram else "PASS",
                     f"work directory {work[0]} on {work[1]}" + (": cold reads were warm" if in_ram else "")))
    total = sum(s for _, s in ran.values())
    planned = sum(limits.values())
    ok = limit is not None and planned == limit and total <= limit
    rows.append(("total time", "PASS" if ok else "FAIL",
                 f"{total:.0f} s (limit {limit} s; the steps' limits add up to {planned} s)"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'check':<{width}}  {'result':<10} figures", "-" * (width + 60)]
    lines += [f"{name:<{width}}  {result:<10} {figures}" for name, result, figures in rows]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(results, "summary.txt"), "w") as f:
        f.write(text + "\n")
    failed = [r for r in rows if r[1].startswith("FAIL")]
    with open(os.path.join(results, "summary.json"), "w") as f:
        json.dump({"rows": rows, "failed": len(failed)}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
