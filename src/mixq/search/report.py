"""The search report: a table shaped like the seed's (with zero-shot columns where tasks were scored), a
Pareto scatter, a bit-allocation map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixq.formats import parse_format
from mixq.search.objective import best_trial


def write_report(run_dir: Path, report: dict[str, Any], trials: list[dict[str, Any]]) -> None:
    """report.json, report.md, pareto.png and bits.png in ``run_dir``."""
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    rows = report["rows"]
    lines = [f"# mixq search · {report['model']} · {report['backend']} · {len(trials)} trials", "",
             f"Budget: {report['budget']}. Scored on {report['score']}; final numbers on {report['final']}.",
             f"Proposals rejected as over budget (not counted as trials): {report['rejected']}.",
             f"Trial time: {report['mean_eval_seconds']:.3f} s evaluation (mean per trial); "
             f"{report['mean_propose_seconds']:.3f} s proposal (mean over the {report.get('proposals', len(trials))} "
             "proposed trials, repair included).", f"Solver: {report['solver_note']}"]
    req = report.get("requantize")
    if req and req["trials"]:
        naive, cached = sum(req["requantize_seconds"]) / req["trials"], sum(req["cached_seconds"]) / req["trials"]
        lines.append(f"Without the weight cache a trial reloads the full-precision weights, requantizes every layer "
                     f"and scores: {naive:.3f} s per trial against {cached:.3f} s with the cache "
                     f"({naive / cached:.1f}x, {req['trials']} plans timed in this run; loading the model took "
                     f"{req['load_seconds']:.1f} s).")
    objective = report.get("objective") or {"objective": "ppl"}
    lines += _objective_lines(objective, report)
    tasks = list(rows[0].get("tasks", {})) if rows else []
    metric = objective.get("task_metric") or "acc"
    speed = any("predicted_tokens_per_s" in r for r in rows)
    head = ["plan", "ppl (final)", *(f"{t} {metric} (%)" for t in tasks), *([f"mean {metric} (%)"] if tasks else []),
            "bits/weight", "size (bytes)", *(["decode tok/s (predicted)"] if speed else [])]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        accs = [_pct(r["tasks"][t], metric) for t in tasks] + ([f"{100 * r['acc']:.1f}"] if tasks else [])
        tps = ([f"{r['predicted_tokens_per_s']:.1f}" if "predicted_tokens_per_s" in r else ""] if speed else [])
        lines.append(" | ".join(["", r["label"], f"{r['ppl']:.3f}", *accs, f"{r['bits_per_weight']:.4f}",
                                 f"{r['size_bytes']:,}", *tps, ""]).strip())
    if report.get("starts"):
        acc = any("acc" in s for s in report["starts"])
        lines += ["", "Starts (evaluated before the backend's proposals; ppl on the scoring windows"
                  + (", acc on the scoring subset" if acc else "") + "):", "",
                  "| start | ppl (scoring) |" + (" acc (scoring) |" if acc else "") + " bits/weight |",
                  "|---|---|" + ("---|" if acc else "") + "---|"]
        for s in report["starts"]:
            cell = "" if not acc else f" {s['acc']:.4f}{'' if s.get('feasible', True) else ' (below --min-acc)'} |"
            lines.append(f"| {s['label']} | {s['ppl']:.3f} |{cell} {s['bits_per_weight']:.4f} |")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    _plots(run_dir, rows, trials, objective.get("objective") == "acc", report.get("best"))


def _pct(metrics: dict[str, Any], metric: str) -> str:
    cell = f"{100 * metrics[metric]:.1f}"
    if f"{metric}_stderr" in metrics:
        cell += f" ± {100 * metrics[f'{metric}_stderr']:.1f}"
    return cell


def _objective_lines(objective: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """What the trials were scored on, in words (older reports: perplexity)."""
    kind, tasks = objective.get("objective", "ppl"), objective.get("tasks")
    lines = []
    if kind == "throughput":
        rule = report.get("max_ppl_rule")
        bound = (f"uniform {rule['choice']}'s {rule['ppl']:.4f} + {100 * rule['fraction']:g}% = {objective['max_ppl']:.4f} "
                 f"(the re-scored best trials: at most {rule['rescore_max_ppl']:.4f}, the same rule on the re-scoring "
                 "windows)" if rule else f"{objective['max_ppl']}")
        lat = report.get("latency") or {}
        lines.append(f"Objective: the highest decode tokens/s predicted by the latency table ({lat.get('device', '?')}, "
                     f"batch {lat.get('batch', '?')}) among plans whose perplexity on the scoring windows is at most "
                     f"{bound}; {report.get('infeasible', 0)} trials were above it (kept in trials.jsonl with "
                     "feasible: false). The final table's tokens/s are predictions for that GPU, not measured here.")
    elif kind == "acc":
        lines.append(f"Objective: the highest mean zero-shot {objective['task_metric']} over {', '.join(tasks)} "
                     "(the study minimises 1 − acc); perplexity is recorded alongside.")
    elif objective.get("min_acc") is not None:
        lines.append(f"Objective: the lowest perplexity among plans whose mean zero-shot {objective['task_metric']} over "
                     f"{', '.join(tasks)} is at least {objective['min_acc']}; "
                     f"{report.get('infeasible', 0)} trials fell below it (kept in trials.jsonl with feasible: false; "
                     "told to the backend with a penalised loss, see mixq.search.objective).")
        best = report.get("best") or {}
        if not best.get("feasible", True):
            lines.append(f"**No trial met the accuracy bound**: the plan reported as best is the closest miss "
                         f"(acc {best['acc']:.4f} on the scoring subset).")
    elif tasks:
        lines.append(f"Zero-shot {objective['task_metric']} over {', '.join(tasks)} is recorded with every trial "
                     "(not optimised).")
    if report.get("tasks_note"):
        lines.append(f"Tasks: {report['tasks_note']}.")
    return lines


def _plots(run_dir: Path, rows: list[dict[str, Any]], trials: list[dict[str, Any]], accuracy: bool = False,
           best: dict[str, Any] | None = None) -> None:
    try:
        import matplotlib
    except ImportError:  # a declared dependency; a bare environment still gets its tables
        print("mixq: plots skipped (matplotlib is not installed)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "acc" if accuracy else "ppl"  # an accuracy search plots accuracy against size
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t["size_bytes"] / 1e6 for t in trials], [t[key] for t in trials], s=10, alpha=0.5,
               label="trials (scoring subset)" if accuracy else "trials (scoring windows)")
    for r in rows:
        ax.scatter([r["size_bytes"] / 1e6], [r[key]], marker="*", s=120, label=f"{r['label']} (final)")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("mean zero-shot accuracy" if accuracy else "perplexity")
    if not accuracy:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "pareto.png", dpi=120)
    plt.close(fig)

    best = best or best_trial(trials)
    rules = best["plan"]["rules"]
    names = [r["match"] for r in rules]
    bits = [parse_format(r["format"]).code_bits for r in rules]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.04), 3))
    ax.bar(range(len(names)), bits, color=["C0" if "attn" in n else "C1" for n in names])
    ax.set_xlabel("layer (model order; blue attention, orange MLP)")
    ax.set_ylabel("code bits")
    ax.set_title("bit allocation of the best plan")
    fig.tight_layout()
    fig.savefig(run_dir / "bits.png", dpi=120)
    plt.close(fig)
