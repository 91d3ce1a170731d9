"""``mixq search``: per-unit formats under a size budget (or a Pareto front), then the final table on the test split."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
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
                                                   "file; default: block granularity, int2..int8; --solver and its options "
                                                   "set the solver of the choices that name none")
    se.add_argument("--profile", default=None, help="a mixq profile file: the fraction widths of a fraction: profile space")
    se.add_argument("--objective", default="ppl", choices=["ppl", "pareto", "acc", "throughput"],
                    help="ppl: lowest perplexity on validation windows within the budget (with --min-acc: among plans "
                         "accurate enough); pareto: the perplexity/size (or --pareto-over latency) front; acc: highest "
                         "mean zero-shot accuracy over --tasks within the budget; throughput: the fastest plan (decode "
                         "time predicted by --latency-table) whose validation perplexity is at most --max-ppl")
    se.add_argument("--max-ppl", default=None, metavar="X",
                    help="with --objective throughput: the perplexity bound on the scoring windows, a number or "
                         "CHOICE+P%% (e.g. int8+5%%: uniform int8's perplexity on the same windows, plus 5%%)")
    se.add_argument("--pareto-over", default="size", choices=["size", "latency"],
                    help="with --objective pareto: the second objective, model size or predicted decode time")
    lat = se.add_argument_group("latency model (--objective throughput, --pareto-over latency)")
    lat.add_argument("--latency-table", default=None, metavar="JSON",
                     help="per-layer latencies measured by bench/speed.py (e.g. bench/results/speed_smollm2_h200/"
                          "latency_table.json): the search predicts decode time on the GPU they were measured on")
    lat.add_argument("--latency-device", default=None, help="which device of the table (default: its only one)")
    lat.add_argument("--latency-model", default=None,
                     help="the table's name for the rest of the model (default: --model, e.g. smollm2-135m)")
    lat.add_argument("--latency-batch", type=int, default=1, help="decode batch the prediction is for (default 1)")
    lat.add_argument("--kernel-backend", default="auto", help="kernels the prediction assumes (auto, torchao, gemlite)")
    lat.add_argument("--measure-speed", action="store_true",
                     help="on CUDA: measure the decode speed of the base, the best plan and the uniform plans of the "
                          "final table end to end (mixq.runtime)")
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
    se.add_argument("--db", default=None, metavar="DIR",
                    help="layer database the trials read: every searched layer solved at every choice on the base "
                         "model's calibration windows (--nsamples, --seqlen, --calib-dataset, --calib-split, --seed, "
                         "--batch-size), built first where it lacks entries; used when a choice's solver needs "
                         "calibration (e.g. int3-g64:quantease, or --solver quantease); default RUN_DIR/db")
    se.add_argument("--sequential-top", type=int, default=2, metavar="N",
                    help="with a layer database: also solve the best N plans sequentially (each block fed by the "
                         "quantized ones) and keep the solution that scores better on the re-scoring windows "
                         "(default 2; 0: the database's)")
    add_shared(se)
    return se



def run(args: argparse.Namespace) -> int:
    from mixq.commands.database import calibration_key, ensure_entries
    from mixq.data import bos_rule, model_windows
    from mixq.database import LayerDatabase
    from mixq.errors import PlanError
    from mixq.evaluate import perplexity
    from mixq.plan import Plan
    from mixq.quantize import quantized_copy
    from mixq.search import SearchConfig, SearchSpace, Start, run_search
    from mixq.search.backends import check_backend
    from mixq.search.cache import WeightCache, database_entries
    from mixq.search.objective import (RESCORE_FACTOR, check_tasks, feasible, mean_accuracy, pareto_front, parse_tasks,
                                       rank, task_summary, zero_shot_scorer)
    from mixq.search.report import write_report
    from mixq.search.seed_files import bind_space, export_seed_files, initial_starts, read_space, seed_space_of
    from mixq.search.size import SizeModel
    from mixq.search.starts import guided_starts
    from mixq.search.target import restrict as restrict_to_target
    from mixq.search.store import Store
    from mixq.search.timing import requantize_seconds

    run_ = setup_run(args)
    device, dtype, batch = run_.device, run_.dtype, run_.batch_size
    if args.max_size is None and args.max_bits is None and args.objective not in ("pareto", "throughput"):
        raise MixqError("give a budget: --max-size or --max-bits (or --objective pareto or throughput)")
    if args.trials < 1:
        raise MixqError(f"--trials must be positive, got {args.trials}")
    if args.final_task_limit is not None and args.final_task_limit < 1:
        raise MixqError(f"--final-task-limit must be positive, got {args.final_task_limit}")
    if args.sequential_top < 0:
        raise MixqError(f"--sequential-top must be 0 or more, got {args.sequential_top}")
    check_backend(args.backend, 2 if args.objective == "pareto" else 1)  # before loading anything
    cluster = cluster_of(args, device)  # Ray checked for before anything loads
    tasks = parse_tasks(args.tasks)
    bound_rule = relative_bound(args.max_ppl)  # (choice, fraction) of CHOICE+P%, else None
    config = SearchConfig(backend=args.backend, trials=args.trials, max_bits=args.max_bits,
                          max_size=None if args.max_size is None else parse_size(args.max_size), seed=args.seed,
                          batch_size=batch, objective=args.objective, tasks=tasks, task_limit=args.task_limit,
                          task_metric=args.task_metric, min_acc=args.min_acc,
                          max_ppl=None if args.max_ppl is None else (1.0 if bound_rule else float(args.max_ppl)),
                          pareto_over=args.pareto_over)  # a CHOICE+P% bound is measured once the windows are read
    if config.needs_latency and args.latency_table is None:
        raise MixqError(f"--objective {args.objective}{' --pareto-over latency' if args.objective == 'pareto' else ''} "
                        "predicts decode time: give --latency-table (measured by bench/speed.py)")
    if tasks:
        check_tasks(tasks, args.data_dir, config.task_metric)  # a missing task file is refused before the model loads
    given = read_space(args.space)
    sens = None
    if args.sens:
        if not Path(args.sens).is_file():
            raise MixqError(f"sensitivity file not found: {args.sens}")
        sens = json.loads(Path(args.sens).read_text())
    run_dir = Path(args.run_dir)
    t_load = time.perf_counter()
    loaded = load_for(args, run_)
    load_seconds = time.perf_counter() - t_load
    model = loaded.model
    space = bind_space(given, model).with_solver(args.solver, solver_options(args))
    if args.profile:
        space = space.with_profile(args.profile)
    if args.export_seed_files:
        seed_space_of(space, model)  # a space the seed files cannot hold is refused before the search
    identity = loaded.identity()
    units = space.units(model)
    space = restrict_to_target(space, model, units)  # target: torchao | gemlite | gguf (a no-op without)
    db = key = calib = build = None
    if space.needs_calibration() or args.db is not None:  # the trials read a layer database
        key, calib = calibration_key(args, loaded, run_)
        db = LayerDatabase.open(Path(args.db) if args.db else run_dir / "db", key)
        build = ensure_entries(args, model, db, database_entries(model, space, units), calib, run_)
    if sens is not None and key is not None and sens.get("meta", {}).get("database") not in (None, key.to_dict()):
        raise MixqError(f"{args.sens} was measured on another layer database than {db.path}: "  # type: ignore[union-attr]
                        "measure it on this one (mixq sensitivity --db)")
    limit = args.limit or 4

    def text_windows(split: str, n: int | None) -> Any:
        return model_windows(model, loaded.tokenizer, "wikitext2", split, args.seqlen, root=args.data_dir, limit=n)

    rescore = text_windows("validation", RESCORE_FACTOR * limit)
    score, test = rescore[:limit], text_windows("test", args.final_limit)  # the scoring windows: the first re-scoring ones
    bos = bos_rule(model, loaded.tokenizer)
    task_batch = args.batch_size or (64 if device.startswith("cuda") else 8)

    def scorer(task_limit: int | None, stderr: bool = False):  # type: ignore[no-untyped-def]
        return zero_shot_scorer(loaded.tokenizer, tasks, data_dir=args.data_dir, limit=task_limit,
                                batch_size=task_batch, device=device,
                                add_bos=bos is not None, stderr=stderr)

    cache = WeightCache.for_space(model, space, units, database=db)
    latency = _latency(args, model, space, units) if args.latency_table else None
    bound = None
    if bound_rule is not None:
        bound = _measured_bound(bound_rule, space, units, cache, model, score, rescore, batch)
        config = dataclasses.replace(config, max_ppl=bound["max_ppl"])
        say(args, f"--max-ppl {args.max_ppl}: uniform {bound['choice']} scores {bound['ppl']:.4f} on the scoring "
                  f"windows; bound {bound['max_ppl']:.4f}")
    size = SizeModel(space, units, model)
    meta = {"model": args.model, "model_sha256": identity["sha256"], "space": space.to_dict(), **config.describe(),
            "max_bits": config.max_bits, "max_size": config.max_size, "seqlen": args.seqlen, "limit": limit,
            "backend": args.backend, "trials": args.trials, "seed": args.seed, "command": args.command_line,
            "database": None if key is None else key.digest(), **({"max_ppl_rule": bound} if bound else {})}
    initial = [Start(f"uniform {c}", {u.name: c for u in units}) for c in space.choices]  # uniform baselines first
    initial += [s for p in args.initial for s in initial_starts(p, space, units, model, given)]
    guided = []
    if sens is not None:
        guided = guided_starts(sens, space, units, size, config, count=args.starts, seed=args.seed)
        initial += guided
    if cluster is not None:
        from mixq.cluster import ModelSpec
        from mixq.search.distributed import ZeroShotSpec, run_distributed_search

        if db is not None or config.needs_latency:
            raise MixqError("--workers reads RTN weights on each worker and scores perplexity or accuracy; a layer "
                            "database search or a latency objective runs in one process")
        trials = run_distributed_search(
            model, space, score, config, run_dir, spec=ModelSpec(args.model, dtype, cluster.device), cluster=cluster,
            meta=meta, resume=args.resume, initial=initial, progress=not args.json,
            zero_shot=ZeroShotSpec(args.data_dir, task_batch) if tasks else None)
    else:
        trials = run_search(model, space, score, config, run_dir, meta=meta, resume=args.resume, initial=initial,
                            progress=not args.json, zero_shot=scorer(config.task_limit) if tasks else None, cache=cache,
                            latency=latency)
    # multi-fidelity: re-score the best few on more windows (accuracy: on more task examples), then the final table
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

    def order(t: dict[str, Any]) -> tuple:  # the better solution first: on the re-scoring windows (or task examples)
        if config.objective == "acc":
            return (-t["rescore_acc"], -t["acc"], t["bits_per_weight"])
        if config.objective == "throughput":  # within the bound on the re-scoring windows, then the fastest
            # a CHOICE+P% bound is measured again on the re-scoring windows: each bound on its own windows
            limit_ppl = bound["rescore_max_ppl"] if bound else config.max_ppl
            return (t["rescore_ppl"] > limit_ppl, t["predicted_s"], t["rescore_ppl"])
        return (not feasible(t), t["rescore_ppl"])  # the trials meeting --min-acc first

    final_tasks = scorer(args.final_task_limit, stderr=True) if tasks else None

    def scored(label: str, m: Any) -> dict[str, Any]:
        row = {"label": label, "ppl": perplexity(m, test, batch_size=batch).ppl}
        if final_tasks is not None:
            table = final_tasks(m)
            row.update({"acc": mean_accuracy(table, config.task_metric), "tasks": task_summary(table)})
        return row

    def final(label: str, plan: Any, calibration: Any = None) -> dict[str, Any]:
        """A plan quantized in a copy of the model (with ``calibration``: sequentially), on the test split."""
        t0 = time.perf_counter()
        with quantized_copy(model, plan, calibration=calibration, device=device, batch_size=batch) as (m, _):
            rep = plan.size_report(model)
            row = {**scored(label, m), "bits_per_weight": rep.bits_per_weight, "size_bytes": rep.size_bytes}
        row["seconds"] = time.perf_counter() - t0
        if latency is not None:
            row["predicted_tokens_per_s"] = 1.0 / latency.predict_plan(plan)
        return row

    def from_cache(label: str, assignment: dict[str, str]) -> dict[str, Any]:
        """An assignment's weights from the cache (a layer database's: the independent solution), on the test split."""
        t0 = time.perf_counter()
        cache.apply(units, assignment)
        try:
            row = scored(label, model)
        finally:
            cache.restore()
        bits, nbytes = size(assignment)
        if latency is not None:
            row["predicted_tokens_per_s"] = 1.0 / latency.predict(assignment)
        return {**row, "bits_per_weight": bits, "size_bytes": nbytes, "seconds": time.perf_counter() - t0}

    # with a layer database: the best plans solved sequentially too; the better solution on validation is kept
    solutions = [{**t, "solution": "independent"} if db is not None else t for t in top]
    sequential = []
    for t in (sorted(top, key=order)[: args.sequential_top] if db is not None else []):
        say(args, f"solving trial {t['number']}'s plan sequentially ({len(calib)} calibration windows)")
        t0 = time.perf_counter()
        with quantized_copy(model, Plan.from_dict(t["plan"]), calibration=calib, device=device, batch_size=batch) as (m, _):
            v = {"rescore_ppl": perplexity(m, rescore, batch_size=batch).ppl}
            if config.objective == "acc":
                table = scorer(wider)(m)
                v["rescore_acc"], v["rescore_tasks"] = mean_accuracy(table, config.task_metric), task_summary(table)
            elif config.min_acc is not None:
                v["acc"] = mean_accuracy(scorer(config.task_limit)(m), config.task_metric)
                v["feasible"] = config.loss(v["rescore_ppl"], v["acc"])[1]
            row = {**scored("best searched plan, sequential", m), "bits_per_weight": t["bits_per_weight"],
                   "size_bytes": t["size_bytes"]}
        row["seconds"] = time.perf_counter() - t0
        sequential.append({"number": t["number"], "independent_rescore_ppl": t["rescore_ppl"], **v, "test": row})
        solutions.append({**t, **v, "solution": "sequential", "test_row": row})
    best = min(solutions, key=order)
    best_plan = Plan.from_dict(best["plan"])
    _save_best_plan(run_dir / "best_plan.yaml", best_plan, best.get("solution", ""), key, args)
    if args.export_seed_files:
        export_seed_files(args.export_seed_files, space, model,
                          [best["assignment"]] + [t["assignment"] for t in top if t is not best])

    uniform = [c for c in space.choices if config.budget_ok(*size({u.name: c for u in units}))]
    rows = [final("base (16-bit)", Plan())]
    for name in ("int8", "int4-g128"):
        try:
            rows.append(final(f"{name} uniform", Plan.uniform(name)))
        except PlanError:  # a format this model's rows cannot take (e.g. groups wider than a row)
            pass
    top_uniform = max(uniform, key=lambda c: size({u.name: c for u in units})[1]) if uniform else None
    independent = " (independent, layer database)" if db is not None else ""
    if top_uniform is not None:
        a = {u.name: top_uniform for u in units}
        rows.append(from_cache(f"heuristic: largest uniform that fits ({top_uniform}){independent}", a))
        if db is not None and args.sequential_top:
            rows.append(final(f"heuristic: largest uniform that fits ({top_uniform}), sequential", space.plan(units, a), calib))
    scored_starts = {name: rank(t) for t in trials if "start" in t for name in t["start"].split(" = ")}
    best_uniform = min(uniform, key=lambda c: scored_starts.get(f"uniform {c}", (True, float("inf")))) if uniform else None
    by = "scoring accuracy" if config.objective == "acc" else "validation ppl"
    if config.min_acc is not None:
        by += f" with acc ≥ {config.min_acc}"
    if (best_uniform is not None and best_uniform != top_uniform and f"uniform {best_uniform}" in scored_starts
            and not scored_starts[f"uniform {best_uniform}"][0]):  # [0]: below --min-acc
        rows.append(from_cache(f"best uniform that fits, by {by} ({best_uniform}){independent}",
                               {u.name: best_uniform for u in units}))
    if guided:  # the first guided start, as the search began from it
        rows.append(from_cache(f"start: {guided[0].label}", guided[0].assignment))
    if db is None:
        rows.append(final("best searched plan", best_plan))
    else:
        chosen = {"independent": "", "sequential": ""}
        chosen[best["solution"]] = " (kept: better on validation)"
        rows.append(from_cache(f"best searched plan, independent (layer database){chosen['independent']}",
                               best["assignment"]))
        seq = next((s["test"] for s in sequential if s["number"] == best["number"]), None)
        if seq is not None:
            rows.append({**seq, "label": seq["label"] + chosen["sequential"]})
    if config.objective == "pareto":
        front = pareto_front(trials, config.pareto_over)
        (run_dir / "pareto_front.json").write_text(json.dumps(front, indent=2))
        step = max(1, len(front) // 6)  # at most about six points of the front on the test split
        for t in front[::step]:
            rows.append(from_cache(f"front: {t['bits_per_weight']:.3f} bits/weight{independent}", t["assignment"]))
    budget = " and ".join(x for x in (f"≤ {config.max_bits} bits/weight" if config.max_bits else "",
                                      f"≤ {config.max_size:,} bytes" if config.max_size else "") if x)
    proposed = [t for t in trials if t["source"] != "initial"]
    subset = "all examples" if config.task_limit is None else f"the first {config.task_limit} examples"
    final_subset = "all examples" if args.final_task_limit is None else f"the first {args.final_task_limit} examples"
    solvers = sorted({space.cost_spec(c).solver for c in space.choices})
    if db is None:
        solver_note = f"{', '.join(solvers)} for every trial and for the final plans (cached per layer and choice)"
    else:
        solver_note = (f"{', '.join(solvers)} (each choice's); every trial reads the layer database {db.path} "
                       f"({len(db)} entries, each layer solved alone on the base model's inputs: "
                       f"{key.calibration.nsamples} × {key.calibration.seqlen} calibration windows); the best "
                       f"{len(sequential)} plans also solved sequentially, the better solution on validation kept "
                       f"({best['solution']})")
    best_record = {k: v for k, v in best.items() if k != "test_row"}
    if not budget:
        budget = "none (Pareto front)" if config.objective == "pareto" else "none"
    report = {"model": args.model, "backend": args.backend, "budget": budget, "rows": rows,
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
              "solver_note": solver_note,
              "search_versions": versions("ax-platform", "botorch", "optuna"),
              "best": best_record, "provenance": provenance_record(args, identity, device)}
    if latency is not None:
        report["latency"] = {"table": args.latency_table, "device": latency_device(args.latency_table, args.latency_device),
                             "batch": args.latency_batch, "base_tokens_per_s": 1.0 / latency.base_seconds,
                             "best_tokens_per_s": 1.0 / latency.predict(best["assignment"])}
    if args.measure_speed:
        report["speed"] = _measure_speed(args, model, rows, best_plan, space, units, say)
    if db is not None:
        solve_s = sum(db.entry(n, s).seconds for n, s in best_plan.resolve(model).items() if db.entry(n, s))
        report["database"] = {"path": str(db.path), "entries": len(db), "disk_bytes": db.disk_bytes(),
                              "built": build.built, "build_seconds": build.seconds, "key": key.to_dict(),
                              "best_plan_solve_seconds": solve_s}
        report["sequential"] = sequential
        report["reproduce"] = _reproduce(best["solution"], key, args)
    if tasks:
        rescored = (f"; the best {len(top)} re-scored on up to the first {wider} examples, the best plan chosen on those"
                    if config.objective == "acc" and wider else "")
        report["tasks_note"] = (
            f"zero-shot {config.task_metric} (lm-eval), mean over {', '.join(tasks)}: trials on {subset} of each task"
            f"{rescored}; final table on {final_subset} of each task (lm-eval takes the first examples, so the "
            "final ones include those the search selected on: the searched plan's final accuracy is not held out)")
    if config.min_acc is not None or config.objective == "throughput":
        report["infeasible"] = sum(not feasible(t) for t in trials)
    if bound is not None:
        report["max_ppl_rule"] = bound
    write_report(run_dir, report, Store(run_dir).trials())
    if args.json:
        print(json.dumps({k: report[k] for k in ("rows", "budget", "rejected")} | {"best_plan": str(run_dir / "best_plan.yaml")}))
    else:
        print((run_dir / "report.md").read_text())
    return 0


def _reproduce(solution: str, key: Any, args: argparse.Namespace) -> str:
    """The command that quantizes the best plan as the search evaluated it."""
    mode = " --calibration-mode independent" if solution == "independent" else ""
    return (f"mixq quantize --model {args.model} --plan {Path(args.run_dir) / 'best_plan.yaml'} --out OUT{mode} "
            f"{key.calibration.flags()} --dtype {key.dtype}")


def _save_best_plan(path: Path, plan: Any, solution: str, key: Any, args: argparse.Namespace) -> None:
    """The plan file; with a layer database, a header saying which solution it is and how to reproduce it."""
    if key is None:
        plan.save(path)
        return
    how = ("independent: each layer solved alone on the base model's calibration inputs (the layer database's "
           "solution)" if solution == "independent" else
           "sequential: each block solved on the outputs of the quantized blocks before it")
    path.write_text(f"# solution: {how}\n# reproduce: {_reproduce(solution, key, args)}\n" + plan.to_yaml())


def relative_bound(text: str | None) -> tuple[str, float] | None:
    """``CHOICE+P%`` as (choice, P / 100); None for a plain number (or no bound)."""
    if text is None:
        return None
    try:
        float(text)
        return None
    except ValueError:
        pass
    m = re.fullmatch(r"(.+)\+(\d+(?:\.\d+)?)%", text.strip())
    if m is None:
        raise MixqError(f"--max-ppl {text!r}: expected a perplexity (e.g. 22.7) or CHOICE+P% (e.g. int8+5%)")
    return m.group(1), float(m.group(2)) / 100


def _measured_bound(rule: tuple[str, float], space: Any, units: list[Any], cache: Any, model: Any, score: Any,
                    rescore: Any, batch: int) -> dict[str, Any]:
    """The perplexity of the space's choice uniform on the scoring windows, and the bound above it; the same
    on the re-scoring windows (the best trials are re-scored there and held to that bound)."""
    from mixq.evaluate import perplexity
    from mixq.search.space import choice_name

    choice, fraction = rule
    name = choice_name(choice, space.solver, dict(space.options))
    if name not in space.choices:
        raise MixqError(f"--max-ppl {choice}+{fraction * 100:g}%: {name} is not a choice of the space "
                        f"({', '.join(space.choices)})")
    cache.apply(units, {u.name: name for u in units})
    try:
        ppl = perplexity(model, score, batch_size=batch).ppl
        again = perplexity(model, rescore, batch_size=batch).ppl
    finally:
        cache.restore()
    return {"choice": name, "fraction": fraction, "ppl": ppl, "max_ppl": ppl * (1 + fraction),
            "rescore_ppl": again, "rescore_max_ppl": again * (1 + fraction)}


def latency_device(path: str, device: str | None) -> str:
    from mixq.runtime.latency import LatencyTable

    return LatencyTable.load(path, device).device


def _latency(args: argparse.Namespace, model: Any, space: Any, units: list[Any]) -> Any:
    """The predicted decode seconds per token of an assignment, from the measured latency table."""
    import torch

    from mixq.plan import Plan
    from mixq.runtime.latency import LatencyModel, LatencyTable, linear_shapes
    from mixq.search.loop import Latency

    if args.latency_batch < 1:
        raise MixqError(f"--latency-batch must be positive, got {args.latency_batch}")
    table = LatencyTable.load(args.latency_table, args.latency_device)
    key = args.latency_model or args.model
    # the kernels run in bf16 whatever dtype the search scores in
    lm = LatencyModel(table, linear_shapes(model), key, args.latency_batch, args.kernel_backend, torch.bfloat16, model)
    return Latency(lambda a: lm.predict(space.plan(units, a)), lm.predict(Plan()), lm.predict)


def _measure_speed(args: argparse.Namespace, model: Any, rows: list[dict[str, Any]], best_plan: Any, space: Any,
                   units: list[Any], say: Any) -> dict[str, Any]:
    """Decode tokens/s at ``--latency-batch`` of the base, the best plan and uniform int8, measured on kernels (CUDA)."""
    import copy

    import torch

    from mixq.plan import Plan
    from mixq.runtime.speed import plan_speed

    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise MixqError("--measure-speed runs the plans on CUDA kernels: no CUDA model here")
    out = {}
    for label, plan in (("base", Plan()), ("int8 uniform", Plan.uniform("int8")), ("best searched plan", best_plan)):
        say(args, f"measuring decode speed: {label}")
        m = copy.deepcopy(model).to(torch.bfloat16)
        r = plan_speed(m, plan, batches=(args.latency_batch,), prompt=32, steps=128, prefill=0, backend=args.kernel_backend)
        out[label] = r
        del m
    return out

