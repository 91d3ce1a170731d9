"""Tables and the best-vs-trial plot of the search runs of bench/search_gpu.sh.

    python3 bench/summarize_search.py [--runs bench/results/search] [--out bench/results]

reads RUNS/*_report.json, RUNS/*_trials.jsonl, RUNS/sens_measured.json and RUNS/bench.json and
writes OUT/search_h100.md and OUT/search_best_vs_trial.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _trials(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return out


def _row(report: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    return next((r for r in report["rows"] if r["label"].startswith(prefix)), None)


def _baseline(report: dict[str, Any]) -> dict[str, Any] | None:
    """The uniform plan the search must beat: the largest uniform choice that fits."""
    return _row(report, "heuristic: largest uniform")


def _start_ppl(report: dict[str, Any], label: str) -> float | None:
    return next((s["ppl"] for s in report.get("starts", []) if label in s["label"].split(" = ")), None)


def _fmt_row(r: dict[str, Any]) -> str:
    return f"| {r['label']} | {r['ppl']:.3f} | {r['bits_per_weight']:.4f} | {r['size_bytes']:,} |"


def _speed(report: dict[str, Any]) -> str:
    req = report.get("requantize") or {}
    text = (f"mean {report['mean_eval_seconds']:.3f} s evaluation per trial ({1 / report['mean_eval_seconds']:.1f} "
            f"trials/s), {report['mean_propose_seconds']:.3f} s per proposal ({report.get('proposals', '?')} proposed "
            f"trials; {report['rejected']} proposals over budget rejected and repaired)")
    if req.get("trials"):
        naive = sum(req["requantize_seconds"]) / req["trials"]
        cached = sum(req["cached_seconds"]) / req["trials"]
        text += (f"; reload-and-requantize loop {naive:.3f} s per trial against {cached:.3f} s from the cache "
                 f"({naive / cached:.1f}x), model load {req['load_seconds']:.1f} s")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=HERE / "results" / "search")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    runs, out = args.runs, args.out
    reports = {p.name[: -len("_report.json")]: json.loads(p.read_text()) for p in sorted(runs.glob("*_report.json"))}
    if not reports:
        raise SystemExit(f"no *_report.json in {runs}")
    trials = {n: _trials(runs / f"{n}_trials.jsonl") for n in reports}
    bench = json.loads((runs / "bench.json").read_text()) if (runs / "bench.json").is_file() else {}
    first = next(iter(reports.values()))
    prov = first["provenance"]
    lines = [f"# Mixed-precision search on SmolLM2-135M, one {prov['device']} ({prov['date'][:10]})", ""]
    took = f", {bench['seconds'] / 60:.1f} minutes in all" if "seconds" in bench else ""
    host = f" on a host of {bench['cpus']} CPU cores" if "cpus" in bench else ""
    lines += [f"Command: `{bench.get('command', 'bench/search_gpu.sh MODEL DATA OUT')}`{host}{took}; then "
              f"`python3 bench/summarize_search.py`. RTN for every trial; {first.get('dtype', 'float16')}; the base is the "
              "GGUF's dequantised "
              f"weights; torch {prov['versions'].get('torch')}, "
              + ", ".join(f"{k} {v}" for k, v in (first.get("search_versions") or {}).items())
              + f". The {len(reports)} studies ran at the same time on the one device (their evaluation times include "
              "that sharing).",
              ""]
    sens_path = runs / "sens_measured.json"
    if sens_path.is_file():
        sens = json.loads(sens_path.read_text())
        m = sens["meta"]
        lines += [f"Sensitivity: KL to the base model of each of the {len(sens['layers'])} Linear layers quantized alone, "
                  f"at {len(m['formats'])} formats ({', '.join(m['formats'])}), on {m['nsamples']} validation windows × "
                  f"{m['seqlen']} tokens: {sens.get('seconds', {}).get('measured', float('nan')):.0f} s, once, "
                  "shared by the studies (`mixq sensitivity --method measured`). Each study starts from the uniform plans "
                  "and four guided plans: the allocation over its units with the least summed KL within the budget "
                  "(greedy by KL per bit, then exchanges), and three with jittered costs.", ""]
    # the headline: each study's best plan against the uniform plan it must beat, on the full test split
    lines += ["## Best plans against uniform (WikiText-2 test perplexity)", "",
              "| study | granularity | budget | uniform baseline | guided start | best searched plan | best, GPTQ |",
              "|---|---|---|---|---|---|---|"]
    for name, r in reports.items():
        base, guided, best = _baseline(r), _row(r, "start: guided"), _row(r, "best searched plan")
        gptq = next((x for x in r["rows"] if x["label"].startswith("best searched plan, re-solved")), None)
        cell = lambda x: "—" if x is None else f"{x['ppl']:.3f} ({x['bits_per_weight']:.3f} b/w)"  # noqa: E731
        base_cell = "—" if base is None else f"{base['label'].split('(')[-1].rstrip(')')}: {cell(base)}"
        lines.append(f"| {name} ({r['backend']}) | {r.get('space', {}).get('granularity', '?')} | {r['budget']} | "
                     f"{base_cell} | {cell(guided)} | {cell(best)} | {cell(gptq)} |")
    lines.append("")
    for name, r in reports.items():
        t = trials[name]
        lines += [f"## {name}: {r['backend']}, {r.get('space', {}).get('granularity', '?')} granularity "
                  f"({r.get('units', '?')} units), budget {r['budget']}", "",
                  f"{len(t)} trials; {_speed(r)}.", "", "| plan | test ppl | bits/weight | size (bytes) |", "|---|---|---|---|"]
        lines += [_fmt_row(row) for row in r["rows"]]
        if r.get("starts"):
            lines += ["", "Starts (validation ppl on the scoring windows): "
                      + "; ".join(f"{s['label']} {s['ppl']:.2f}" for s in r["starts"]) + "."]
        lines.append("")
    _plot(reports, trials, out / "search_best_vs_trial.png")
    lines.append("![best value vs trial](search_best_vs_trial.png)")
    (out / "search_h100.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'search_h100.md'} and {out / 'search_best_vs_trial.png'}")


def _plot(reports: dict[str, Any], trials: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(r["budget"] for r in reports.values()))
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        uniform = None
        for name, r in reports.items():
            if r["budget"] != budget:
                continue
            best, curve = float("inf"), []
            for t in trials[name]:
                best = min(best, t["ppl"])
                curve.append(best)
            line, = ax.plot(range(1, len(curve) + 1), curve, label=f"{name} ({r.get('space', {}).get('granularity', '?')})")
            first = next((i + 1 for i, t in enumerate(trials[name]) if t["source"] != "initial"), None)
            if first is not None:  # the starts end here; the backend's proposals follow
                ax.axvline(first, color=line.get_color(), linestyle=":", alpha=0.6)
            base = _baseline(r)
            if base is not None:
                fmt = base["label"].split("(")[-1].rstrip(")")
                uniform = (fmt, _start_ppl(r, f"uniform {fmt}"))
        if uniform is not None and uniform[1] is not None:
            ax.axhline(uniform[1], color="gray", linestyle="--", label=f"uniform {uniform[0]}")
            ax.set_ylim(top=1.5 * uniform[1])  # the first starts (the cheapest uniform plans) are far above
        ax.set_title(f"budget {budget}", fontsize=9)
        ax.set_xlabel("trial (dotted: the first proposal after the starts)")
        ax.set_ylabel("best validation ppl so far (scoring windows)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
