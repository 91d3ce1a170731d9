"""``mixq report RUN_DIR``: re-render a search's report (or summarise a study that has not finished)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mixq.errors import MixqError

NAME = "report"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="re-render the report of a search run directory")
    p.add_argument("run_dir")
    return p


def run(args: argparse.Namespace) -> int:
    from mixq.search.objective import best_trial, feasible
    from mixq.search.report import write_report
    from mixq.search.store import Store

    run_dir = Path(args.run_dir)
    path = run_dir / "report.json"
    if not path.is_file():
        trials = Store(run_dir).trials()
        if not trials:
            raise MixqError(f"{run_dir} holds no search (no report.json, no trials.jsonl)")
        best = best_trial(trials)
        meta = run_dir / "config.json"
        objective = json.loads(meta.read_text()).get("objective") if meta.is_file() else None
        what = (f"best acc on the scoring subset {best['acc']:.4f} (ppl {best['ppl']:.4f})" if objective == "acc"
                else f"best ppl on the scoring windows {best['ppl']:.4f}")
        if not feasible(best):
            what += f" (no trial meets the accuracy bound; closest acc {best['acc']:.4f})"
        print(f"{len(trials)} trials so far (no final report yet); {what} at {best['bits_per_weight']:.4f} bits/weight")
        return 0
    write_report(run_dir, json.loads(path.read_text()), Store(run_dir).trials())
    print((run_dir / "report.md").read_text())
    return 0
