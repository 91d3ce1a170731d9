"""bench/results/zeroshot.md from the JSON lines of bench/zeroshot_gpu.sh.

    python3 bench/summarize_zeroshot.py RUN_DIR/zeroshot.jsonl --device "NVIDIA H100 80GB HBM3" --date 2026-11-25
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ["arc_easy", "piqa", "lambada_openai", "copa", "openbook_qa", "siqa"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--device", required=True)
    ap.add_argument("--date", required=True)
    ap.add_argument("--out", default="bench/results/zeroshot.md")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
    cmd = rows[0]["provenance"]["command"]
    n = {t: rows[0]["tasks"][t]["n"] for t in TASKS if t in rows[0]["tasks"]}
    md = [f"# Zero-shot accuracy, SmolLM2-135M-Instruct, {args.device} ({args.date})", "",
          f"Command: `{cmd}` (`bench/zeroshot_gpu.sh`). lm-eval {rows[0]['provenance'].get('versions', {}).get('lm_eval', '')}"
          " with mixq's local task files (llm-foundry layout, so the scores compare with each other, not with lm-eval's "
          "hub variants); acc and acc_norm (length-normalised) in % ± standard error; LAMBADA: greedy accuracy and "
          "perplexity of the continuation. Examples per task: " + ", ".join(f"{t} {k}" for t, k in n.items()) + ". "
          "The base is the GGUF's dequantised weights (stored at 4-5 bits); WikiText-2 test perplexity at 2048, all windows.",
          "", "| plan | bits/weight | wikitext2 ppl | " + " | ".join(TASKS) + " | mean acc |",
          "|---|---|---|" + "---|" * (len(TASKS) + 1)]
    for r in rows:
        cells, accs = [], []
        for t in TASKS:
            m = r["tasks"][t]
            accs.append(m["acc"])
            c = f"{100 * m['acc']:.1f} ± {100 * m['acc_stderr']:.1f}"
            if "acc_norm" in m:
                c += f" (norm {100 * m['acc_norm']:.1f})"
            if "perplexity" in m:
                c += f" (ppl {m['perplexity']:.1f})"
            cells.append(c)
        label = r["label"] if r["label"] == "base" else r["plan"]
        md.append(f"| {label} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | " + " | ".join(cells)
                  + f" | {100 * sum(accs) / len(accs):.1f} |")
    Path(args.out).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
