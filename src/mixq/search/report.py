"""The search report: a table shaped like the seed's, a Pareto scatter, a bit-allocation map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixq.formats import parse_format


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
    lines += ["", "| plan | ppl (final) | bits/weight | size (bytes) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {r['bits_per_weight']:.4f} | {r['size_bytes']:,} |")
    if report.get("starts"):
        lines += ["", "Starts (evaluated before the backend's proposals; ppl on the scoring windows):", "",
                  "| start | ppl (scoring) | bits/weight |", "|---|---|---|"]
        lines += [f"| {s['label']} | {s['ppl']:.3f} | {s['bits_per_weight']:.4f} |" for s in report["starts"]]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    _plots(run_dir, rows, trials)


def _plots(run_dir: Path, rows: list[dict[str, Any]], trials: list[dict[str, Any]]) -> None:
    try:
        import matplotlib
    except ImportError:  # a declared dependency; a bare environment still gets its tables
        print("mixq: plots skipped (matplotlib is not installed)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t["size_bytes"] / 1e6 for t in trials], [t["ppl"] for t in trials], s=10, alpha=0.5, label="trials (scoring windows)")
    for r in rows:
        ax.scatter([r["size_bytes"] / 1e6], [r["ppl"]], marker="*", s=120, label=f"{r['label']} (final)")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "pareto.png", dpi=120)
    plt.close(fig)

    best = min(trials, key=lambda t: t["ppl"])
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
