"""``mixq search``: per-unit formats under a size budget (or a Pareto front), then the final table on the test split."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mixq.commands.common import (add_cluster_options, add_shared, calibration, cluster_of, load_for, parse_size,
                                  provenance_record, say, setup_run, solver_options)
from mixq.errors import MixqError
from mixq.provenance import versions

NAME = "search"
REQUANTIZE_TRIALS = 3  # trials of the reload-and-requantize loop timed after the search


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    se = subparsers.add_parser("search", help="search per-layer formats under a size budget")
    se.add_argument("--space", default=None, help="search space file (YAML/JSON) or the first seed's Ax parameter-space "
                                                   "file; default: block granularity, int2..int8")
    se.add_argument("--profile", default=None, help="a mixq profile file: the fraction widths of a fraction: profile space")
    se.add_argument("--objective", default="ppl", choices=["ppl", "pareto", "acc"],
                    help="ppl: lowest perplexity on validation windows within the budget (with --min-acc: among plans "
                         "accurate enough); pareto: the perplexity/size front; acc: highest mean zero-shot accuracy over "
                         "--tasks within the budget")
    se.add_argument("--tasks", default=None,
                    help="comma-separated zero-shot tasks (arc_easy, piqa, lambada_openai, copa, openbook_qa, siqa from "
                         "the data directory, or lm-eval task names), scored in every trial on the first --task-limit "
                         "examples of each and in the final table; needed by --objective acc and --min-acc")
    se.add_argument("--task-limit", type=int, default=200, metavar="N",
                    help="examples of each task per trial: the first N, the same in every trial (default 200)")
    se.add_argument("--task-metric", default="acc", choices=["acc", "acc_norm"],
                    help="the per-task accuracy averaged over --tasks into a trial's acc: acc (the choice of highest "
                         "log-likelihood) or acc_norm (lm-eval's, log-likelihood per character); default acc")
    se.add_argument("--min-acc", type=float, default=None, metavar="X",
                    help="with --objective ppl: a plan whose mean accuracy over --tasks (on the trial subset) is below X "
                         "(0..1) is infeasible: recorded, never the best")
    se.add_argument("--final-task-limit", type=int, default=None, metavar="N",
                    help="examples of each task in the final table (default: all)")
    se.add_argument("--max-size", default=None, help="model size budget, e.g. 100MB, 95MiB, 1.5GB or bytes")
    se.add_argument("--max-bits", type=float, default=None, help="average bits per quantized weight budget")
    se.add_argument("--backend", default="tpe", help="tpe, nsga2, nsga3, qmc, random, gp (Optuna), ax (Bayesian optimisation), evo (local search)")
    se.add_argument("--trials", type=int, default=100)
    se.add_argument("--run-dir", required=True, help="where the study, trials and report are kept")
    se.add_argument("--resume", action="store_true", help="continue the study in --run-dir")
    se.add_argument("--final-limit", type=int, default=None, help="test windows for the final table (default: all)")
    se.add_argument("--initial", action="append", default=[], metavar="PLAN",
                    help="a plan, or the first seed's initial-samples file, to evaluate first (repeatable)")
    se.add_argument("--export-seed-files", default=None, metavar="DIR",
                    help="write the space and the best plans as the first seed's parameter-space and initial-samples files")
    se.add_argument("--sens", default=None, help="sensitivity file (mixq sensitivity): guided starts from it")
    se.add_argument("--starts", type=int, default=4, help="with --sens: how many guided starts (default 4)")
    add_cluster_options(se)
    add_shared(se)
    return se



def run(args: argparse.Namespace) -> int:
    from mixq.data import bos_rule, model_windows
    from mixq.errors import PlanError
    from mixq.evaluate import perplexity
    from mixq.plan import Plan
    from mixq.search import SearchConfig, Start, run_search
    from mixq.search.objective import (
        RESCORE_FACTOR,
        check_tasks,
        feasible,
        mean_accuracy,
        parse_tasks,
        rank,
        task_summary,
        zero_shot_scorer,
    )
    from mixq.search.cache import WeightCache
    from mixq.search.objective import pareto_front
    from mixq.search.report import write_report
    from mixq.search.seed_files import bind_space, export_seed_files, initial_starts, read_space, seed_space_of
    from mixq.search.size import SizeModel
    from mixq.search.starts import guided_starts
    from mixq.search.store import Store
    from mixq.search.timing import requantize_seconds
    from mixq.quantize import quantized_copy

    run_ = setup_run(args)
    device, dtype, batch = run_.device, run_.dtype, run_.batch_size
    if args.max_size is None and args.max_bits is None and args.objective != "pareto":
        raise MixqError("give a budget: --max-size or --max-bits (or --objective pareto)")
    if args.trials < 1:
        raise MixqError(f"--trials must be positive, got {args.trials}")
    if args.final_task_limit is not None and args.final_task_limit < 1:
        raise MixqError(f"--final-task-limit must be positive, got {args.final_task_limit}")
    from mixq.search.backends import check_backend

    check_backend(args.backend, 2 if args.objective == "pareto" else 1)  # before loading anything
    cluster = cluster_of(args, device)  # Ray checked for before anything loads
    tasks = parse_tasks(args.tasks)
    config = SearchConfig(backend=args.backend, trials=args.trials, max_bits=args.max_bits,
                          max_size=None if args.max_size is None else parse_size(args.max_size), seed=args.seed,
                          batch_size=batch, objective=args.objective, tasks=tasks, task_limit=args.task_limit,
                          task_metric=args.task_metric, min_acc=args.min_acc)
    if tasks:
        check_tasks(tasks, args.data_dir, config.task_metric)  # a missing task file is refused before the model loads
    given = read_space(args.space)
    sens = None
    if args.sens:
        if not Path(args.sens).is_file():
            raise MixqError(f"sensitivity file not found: {args.sens}")
        sens = json.loads(Path(args.sens).read_text())
    t_load = time.perf_counter()
    loaded = load_for(args, run_)
    load_seconds = time.perf_counter() - t_load
    model = loaded.model
    space = bind_space(given, model)
    if args.profile:
        space = space.with_profile(args.profile)
    if args.export_seed_files:
        seed_space_of(space, model)  # a space the seed files cannot hold is refused before the search
    limit = args.limit or 4

    def text_windows(split: str, n: int | None) -> Any:
        return model_windows(model, loaded.tokenizer, "wikitext2", split, args.seqlen, root=args.data_dir, limit=n)

    score, rescore, test = text_windows("validation", limit), text_windows("validation", RESCORE_FACTOR * limit), \
        text_windows("test", args.final_limit)
    bos = bos_rule(model, loaded.tokenizer)
    task_batch = args.batch_size or (64 if device.startswith("cuda") else 8)

    def scorer(task_limit: int | None, stderr: bool = False):  # type: ignore[no-untyped-def]
        return zero_shot_scorer(loaded.tokenizer, tasks, data_dir=args.data_dir, limit=task_limit,
                                batch_size=task_batch, device=device,
                                add_bos=bos is not None, stderr=stderr)

    identity = loaded.identity()
    meta = {"model": args.model, "model_sha256": identity["sha256"], "space": space.to_dict(), **config.describe(),
            "max_bits": config.max_bits, "max_size": config.max_size, "seqlen": args.seqlen, "limit": limit,
            "backend": args.backend, "trials": args.trials, "seed": args.seed, "command": args.command_line}
    units = space.units(model)
    initial = [Start(f"uniform {c}", {u.name: c for u in units}) for c in space.choices]  # uniform baselines first
    initial += [s for p in args.initial for s in initial_starts(p, space, units, model, given)]
    guided = []
    if sens is not None:
        guided = guided_starts(sens, space, units, SizeModel(space, units, model), config, count=args.starts, seed=args.seed)
        initial += guided
    run_dir = Path(args.run_dir)
    if cluster is not None:
        from mixq.cluster import ModelSpec
        from mixq.search.distributed import ZeroShotSpec, run_distributed_search

        trials = run_distributed_search(
            model, space, score, config, run_dir, spec=ModelSpec(args.model, dtype, cluster.device), cluster=cluster,
            meta=meta, resume=args.resume, initial=initial, progress=not args.json,
            zero_shot=ZeroShotSpec(args.data_dir, task_batch) if tasks else None)
    else:
        trials = run_search(model, space, score, config, run_dir, meta=meta, resume=args.resume, initial=initial,
                            progress=not args.json, zero_shot=scorer(config.task_limit) if tasks else None)
    # multi-fidelity: re-score the best few on more windows (accuracy: on more task examples), then the final table
    cache = WeightCache.for_space(model, space, units)
    top = sorted({json.dumps(t["assignment"], sort_keys=True): t for t in trials}.values(), key=rank)[:config.rescore_top]
    wider = None if config.task_limit is None else RESCORE_FACTOR * config.task_limit
    for t in top:
        cache.apply(units, t["assignment"])
        t["rescore_ppl"] = perplexity(model, rescore, batch_size=batch).ppl
        if config.objective == "acc":
            table = scorer(wider)(model)
            t["rescore_acc"], t["rescore_tasks"] = mean_accuracy(table, config.task_metric), task_summary(table)
    # the loop the weight cache replaces, timed on the same windows and plans in this process
    timed = [t["assignment"] for t in top[:REQUANTIZE_TRIALS]]
    cached_s = []
    for a in timed:
        t0 = time.perf_counter()
        cache.apply(units, a)
        perplexity(model, score, batch_size=batch)
        cached_s.append(time.perf_counter() - t0)
    cache.restore()
    requantize_s = requantize_seconds(model, space, units, timed, score, batch_size=batch)
    if config.objective == "acc":
        best = max(top, key=lambda t: (t["rescore_acc"], t["acc"], -t["bits_per_weight"]))
    else:  # the trials meeting --min-acc first: re-scoring perplexity does not re-test accuracy
        best = min(top, key=lambda t: (not feasible(t), t["rescore_ppl"]))
    best_plan = Plan.from_dict(best["plan"])
    best_plan.save(run_dir / "best_plan.yaml")
    if args.export_seed_files:
        export_seed_files(args.export_seed_files, space, model,
                          [best["assignment"]] + [t["assignment"] for t in top if t is not best])
    final_tasks = scorer(args.final_task_limit, stderr=True) if tasks else None

    def final(label: str, plan: Any, calibration: Any = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        with quantized_copy(model, plan, calibration=calibration, device=device, batch_size=batch) as (m, _):
            rep = plan.size_report(model)
            row = {"label": label, "ppl": perplexity(m, test, batch_size=batch).ppl,
                   "bits_per_weight": rep.bits_per_weight, "size_bytes": rep.size_bytes}
            if final_tasks is not None:
                table = final_tasks(m)
                row.update({"acc": mean_accuracy(table, config.task_metric), "tasks": task_summary(table)})
        row["seconds"] = time.perf_counter() - t0
        return row

    def fits(p: Any) -> bool:
        rep = p.size_report(model)
        return config.budget_ok(rep.bits_per_weight, rep.size_bytes)

    uniform = [c for c in space.choices if fits(space.uniform(c, units))]
    rows = [final("base (16-bit)", Plan())]
    for name in ("int8", "int4-g128"):
        try:
            rows.append(final(f"{name} uniform", Plan.uniform(name)))
        except PlanError:  # a format this model's rows cannot take (e.g. groups wider than a row)
            pass
    top_uniform = max(uniform, key=lambda c: space.uniform(c, units).bits(model)) if uniform else None
    if top_uniform is not None:
        rows.append(final(f"heuristic: largest uniform that fits ({top_uniform})", space.uniform(top_uniform, units)))
    scored = {name: rank(t) for t in trials if "start" in t for name in t["start"].split(" = ")}
    best_uniform = min(uniform, key=lambda c: scored.get(f"uniform {c}", (True, float("inf")))) if uniform else None
    by = "scoring accuracy" if config.objective == "acc" else "validation ppl"
    if config.min_acc is not None:
        by += f" with acc ≥ {config.min_acc}"
    if (best_uniform is not None and best_uniform != top_uniform and f"uniform {best_uniform}" in scored
            and not scored[f"uniform {best_uniform}"][0]):  # [0]: below --min-acc
        rows.append(final(f"best uniform that fits, by {by} ({best_uniform})", space.uniform(best_uniform, units)))
    if guided:  # the first guided start, as the search began from it
        rows.append(final(f"start: {guided[0].label}", space.plan(units, guided[0].assignment)))
    rows.append(final("best searched plan", best_plan))
    solver = args.solver
    if solver is not None and solver != space.solver:  # the best plan (and the uniform one it beats) re-solved
        opts = solver_options(args)
        plans = [("best searched plan", best_plan)]
        if top_uniform is not None:
            plans.append((f"{top_uniform} uniform", space.uniform(top_uniform, units)))
        plans = [(label, p.with_solver(solver, opts)) for label, p in plans]
        calib = calibration(args, loaded, [p for _, p in plans])
        described = " ".join([solver, *(f"{k}={v}" for k, v in opts.items())])
        for label, p in plans:
            say(args, f"re-solving {label} with {described}")
            rows.append(final(f"{label}, re-solved with {described}", p, calib))
    if config.objective == "pareto":
        front = pareto_front(trials)
        (run_dir / "pareto_front.json").write_text(json.dumps(front, indent=2))
        step = max(1, len(front) // 6)  # at most about six points of the front on the test split
        for t in front[::step]:
            rows.append(final(f"front: {t['bits_per_weight']:.3f} bits/weight", Plan.from_dict(t["plan"])))
    budget = " and ".join(x for x in (f"≤ {config.max_bits} bits/weight" if config.max_bits else "",
                                      f"≤ {config.max_size:,} bytes" if config.max_size else "") if x)
    proposed = [t for t in trials if t["source"] != "initial"]
    subset = "all examples" if config.task_limit is None else f"the first {config.task_limit} examples"
    final_subset = "all examples" if args.final_task_limit is None else f"the first {args.final_task_limit} examples"
    report = {"model": args.model, "backend": args.backend, "budget": budget or "none (Pareto front)", "rows": rows,
              "dtype": dtype,
              "space": space.to_dict(), "units": len(units),
              "score": f"{len(score)} validation windows × {args.seqlen} (re-scored on {len(rescore)})",
              "final": f"{len(test)} test windows × {args.seqlen}",
              "objective": {**config.describe(), "final_task_limit": args.final_task_limit if tasks else None},
              "rejected": max((t.get("rejected_so_far", 0) for t in trials), default=0),
              "mean_eval_seconds": sum(t["eval_seconds"] for t in trials) / len(trials),
              "mean_propose_seconds": sum(t["propose_seconds"] for t in proposed) / max(len(proposed), 1),
              "proposals": len(proposed),
              "starts": [{"label": t["start"], "ppl": t["ppl"], "bits_per_weight": t["bits_per_weight"],
                          "size_bytes": t["size_bytes"], **({"acc": t["acc"]} if "acc" in t else {}),
                          **({"feasible": t["feasible"]} if "feasible" in t else {})} for t in trials if "start" in t],
              "requantize": {"trials": len(timed), "requantize_seconds": requantize_s, "cached_seconds": cached_s,
                             "load_seconds": load_seconds},
              "solver_note": f"{space.solver} for every trial and for the final plans (cached per layer and choice)"
                             + (f"; rows marked 're-solved' use {solver}" if solver and solver != space.solver else ""),
              "search_versions": versions("ax-platform", "botorch", "optuna"),
              "best": best, "provenance": provenance_record(args, identity, device)}
    if tasks:
        rescored = (f"; the best {len(top)} re-scored on up to the first {wider} examples, the best plan chosen on those"
                    if config.objective == "acc" and wider else "")
        report["tasks_note"] = (
            f"zero-shot {config.task_metric} (lm-eval), mean over {', '.join(tasks)}: trials on {subset} of each task"
            f"{rescored}; final table on {final_subset} of each task (lm-eval takes the first examples, so the "
            "final ones include those the search selected on: the searched plan's final accuracy is not held out)")
    if config.min_acc is not None:
        report["infeasible"] = sum(not feasible(t) for t in trials)
    write_report(run_dir, report, Store(run_dir).trials())
    if args.json:
        print(json.dumps({k: report[k] for k in ("rows", "budget", "rejected")} | {"best_plan": str(run_dir / "best_plan.yaml")}))
    else:
        print((run_dir / "report.md").read_text())
    return 0


