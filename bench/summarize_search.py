"""Tables and the best-so-far plot of the search runs in bench/results/search/ (from bench/search_gpu.sh).

    python bench/summarize_search.py > bench/results/search_h100.md
"""

from __future__ import annotations

import json
from pathlib import Path

RUNS = Path(__file__).parent / "results" / "search"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print("# Mixed-precision search on SmolLM2-135M, one NVIDIA H100 80GB HBM3 (2026-11-25)\n")
    print("Command: `bench/search_gpu.sh SmolLM2-135M-Instruct.Q4_1.gguf DATA OUT` (RTN, `bench/space_layer.yaml`: "
          "layer granularity with q/k/v and gate/up tied, 9 choices int2-g64 … int8; scored on 4 validation windows "
          "× 2048, the best 5 re-scored on 16, the final table on the full test split; fp16; the base is the GGUF's "
          "dequantised weights), then `python3 bench/summarize_search.py`. Runs that did not finish inside the "
          "machine's time are absent.\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for report in sorted(RUNS.glob("*_report.json")):
        name = report.name[: -len("_report.json")]
        r = json.loads(report.read_text())
        trials = [json.loads(x) for x in (RUNS / f"{name}_trials.jsonl").read_text().splitlines() if x.strip()]
        print(f"## {name}: {r['backend']}, budget {r['budget']}\n")
        print(f"{len(trials)} trials; {r['rejected']} proposals over budget were rejected and repaired; mean "
              f"{r['mean_eval_seconds']:.3f} s evaluation ({1 / r['mean_eval_seconds']:.1f} trials/s) and "
              f"{r['mean_propose_seconds']:.3f} s proposal + repair per trial.\n")
        print("| plan | test ppl | bits/weight | size (bytes) |\n|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['label']} | {row['ppl']:.3f} | {row['bits_per_weight']:.4f} | {row['size_bytes']:,} |")
        print()
        best, curve = float("inf"), []
        for t in trials:
            best = min(best, t["ppl"])
            curve.append(best)
        ax.plot(range(1, len(curve) + 1), curve, label=f"{name}")
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation ppl so far (4 windows)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RUNS.parent / "search_best_vs_trial.png", dpi=120)
    print("![best value vs trial](search_best_vs_trial.png)")


if __name__ == "__main__":
    main()
