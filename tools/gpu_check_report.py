"""Summarise tools/gpu_check.sh's training runs: loss curves, non-finite or stuck loss terms, final AP.

    python tools/gpu_check_report.py RUNS OUT.json     (reads RUNS/*/log.jsonl and metrics.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _read_log(path: Path) -> tuple[list[dict], list[dict]]:
    steps, events = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            (events if "event" in rec else steps).append(rec)
    return steps, events


def _stuck(values: list[float]) -> bool:
    """A loss term that no longer moves: the last half of the logged values within 1e-3 of each other."""
    tail = values[len(values) // 2:]
    return len(tail) >= 3 and max(tail) - min(tail) < 1e-3


def summarise(run: Path) -> dict:
    steps, events = _read_log(run / "log.jsonl")
    terms = sorted({k for s in steps for k in s if k.startswith("loss")})
    curves = {k: [round(float(s[k]), 4) for s in steps if k in s] for k in terms}
    kinds = [e.get("event") for e in events]
    metrics = {}
    mfile = run / "metrics.json"
    if mfile.is_file():
        m = json.loads(mfile.read_text())
        metrics = {t: (m.get(t) or {}).get("AP") for t in ("bbox", "segm")}
    done = [e for e in events if e.get("event") == "done"]
    return {
        "run": run.name,
        "iterations": steps[-1]["iter"] if steps else 0,
        "seconds_per_iter": round(sum(s.get("time", 0.0) for s in steps) / max(len(steps), 1), 3),
        "finished": bool(done),
        "nonfinite": kinds.count("nonfinite_stop") + kinds.count("nonfinite_skip"),
        "amp_overflow_skipped": kinds.count("amp_overflow_skip"),
        "stuck_terms": [k for k, v in curves.items() if k != "loss" and _stuck(v)],
        "final_ap": metrics,
        "curves": curves,
    }


def main(runs_dir: str, out_json: str) -> int:
    runs = sorted(p for p in Path(runs_dir).iterdir() if p.is_dir()) if Path(runs_dir).is_dir() else []
    report = [summarise(r) for r in runs]
    Path(out_json).write_text(json.dumps(report, indent=1))
    ok = True
    for r in report:
        good = r["finished"] and not r["nonfinite"] and not r["stuck_terms"] and r["iterations"] > 0
        ok &= good
        ap = r["final_ap"]
        print(f"{r['run']:>16}: {'OK  ' if good else 'FAIL'} {r['iterations']} it ({r['seconds_per_iter']} s/it), "
              f"non-finite {r['nonfinite']}, fp16 overflow skips {r['amp_overflow_skipped']}, "
              f"stuck {r['stuck_terms'] or 'none'}, final AP box {ap.get('bbox')} mask {ap.get('segm')}")
        for k, v in r["curves"].items():
            step = max(1, len(v) // 12)
            print(f"{'':>18}{k:>17}: {' '.join(f'{x:.3g}' for x in v[::step])}")
    print("gpu_check:", "all runs trained without non-finite or stuck losses" if ok and report else "FAILED")
    return 0 if ok and report else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
