"""``mixq search`` and ``mixq report``."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from mixq.cli import load_for, parse_size, provenance_record, setup_run
from mixq.errors import MixqError

def cmd_search(args: argparse.Namespace) -> int:
    from mixq.data import load_text, tokenize, windows
    from mixq.errors import PlanError
    from mixq.evaluate import perplexity
    from mixq.plan import Plan
    from mixq.search import SearchConfig, SearchSpace, run_search
    from mixq.search.report import write_report
    from mixq.search.study import Store

    device, dtype, batch = setup_run(args)
    if args.max_size is None and args.max_bits is None and args.objective == "ppl":
        raise MixqError("give a budget: --max-size or --max-bits (or --objective pareto)")
    if args.trials < 1:
        raise MixqError(f"--trials must be positive, got {args.trials}")
    from mixq.search.backends import check_backend

    check_backend(args.backend, 2 if args.objective == "pareto" else 1)  # before loading anything
    space = SearchSpace.load(args.space) if args.space else SearchSpace()
    config = SearchConfig(backend=args.backend, trials=args.trials, max_bits=args.max_bits,
                          max_size=None if args.max_size is None else parse_size(args.max_size), seed=args.seed,
                          batch_size=batch, objective=args.objective)
    loaded = load_for(args, device, dtype)
    model = loaded.model
    val = tokenize(loaded.tokenizer, load_text("wikitext2", "validation", root=args.data_dir))
    limit = args.limit or 4
    score = windows(val, args.seqlen, limit=limit)
    rescore = windows(val, args.seqlen, limit=4 * limit)
    test = windows(tokenize(loaded.tokenizer, load_text("wikitext2", "test", root=args.data_dir)), args.seqlen, limit=args.final_limit)
    identity = loaded.identity()
    meta = {"model": args.model, "model_sha256": identity["sha256"], "space": space.to_dict(), "objective": args.objective,
            "max_bits": config.max_bits, "max_size": config.max_size, "seqlen": args.seqlen, "limit": limit,
            "backend": args.backend, "trials": args.trials, "seed": args.seed, "command": args.command_line}
    units = space.units(model)
    initial = [{u.name: c for u in units} for c in space.choices]  # uniform baselines first
    initial += [space.assignment_of(units, Plan.parse(p), model) for p in args.initial]
    if args.sens:
        from mixq.sensitivity.allocate import allocate, plan_of

        if not Path(args.sens).is_file():
            raise MixqError(f"sensitivity file not found: {args.sens}")
        sens = json.loads(Path(args.sens).read_text())
        for k in range(args.starts):  # the greedy allocation, then randomised variants
            choice = allocate(sens, max_bits=config.max_bits, max_size=config.max_size, jitter=0.0 if k == 0 else 0.5,
                              seed=args.seed + k, formats=space.choices)
            initial.append(space.assignment_of(units, plan_of(choice), model))
    run_dir = Path(args.run_dir)
    trials = run_search(model, space, score, config, run_dir, meta=meta, resume=args.resume, initial=initial,
                        progress=not args.json)
    # multi-fidelity: re-score the best few on more windows, then the final table on the test split
    from mixq.search.study import WeightCache, pareto_front

    cache = WeightCache(model, [layer for u in units for layer in u.layers])
    top = sorted({json.dumps(t["assignment"], sort_keys=True): t for t in trials}.values(), key=lambda t: t["ppl"])[:5]
    for t in top:
        cache.apply(units, t["assignment"])
        t["rescore_ppl"] = perplexity(model, rescore, batch_size=batch).ppl
    cache.restore()
    best = min(top, key=lambda t: t["rescore_ppl"])
    best_plan = Plan.from_dict(best["plan"])
    best_plan.save(run_dir / "best_plan.yaml")

    def final(label: str, plan: Any) -> dict[str, Any]:
        from mixq.quantize import quantize_

        m = model if not plan.resolve(model) else copy.deepcopy(model)
        if m is not model:
            quantize_(m, plan)
        rep = plan.size_report(model)
        row = {"label": label, "ppl": perplexity(m, test, batch_size=batch).ppl, "bits_per_weight": rep.bits_per_weight,
               "size_bytes": rep.size_bytes}
        del m
        return row

    def feasible(p: Any) -> bool:
        rep = p.size_report(model)
        return config.budget_ok(rep.bits_per_weight, rep.size_bytes)

    uniform = [c for c in space.choices if feasible(Plan.uniform(c))]
    rows = [final("base (16-bit)", Plan())]
    for name in ("int8", "int4-g128"):
        try:
            rows.append(final(f"{name} uniform", Plan.uniform(name)))
        except PlanError:  # a format this model's rows cannot take (e.g. groups wider than a row)
            pass
    if uniform:
        top_uniform = max(uniform, key=lambda c: Plan.uniform(c).bits(model))
        rows.append(final(f"heuristic: largest uniform that fits ({top_uniform})", Plan.uniform(top_uniform)))
    rows.append(final("best searched plan", best_plan))
    if config.objective == "pareto":
        front = pareto_front(trials)
        (run_dir / "pareto_front.json").write_text(json.dumps(front, indent=2))
        step = max(1, len(front) // 6)  # at most about six points of the front on the test split
        for t in front[::step]:
            rows.append(final(f"front: {t['bits_per_weight']:.3f} bits/weight", Plan.from_dict(t["plan"])))
    budget = " and ".join(x for x in (f"≤ {config.max_bits} bits/weight" if config.max_bits else "",
                                      f"≤ {config.max_size:,} bytes" if config.max_size else "") if x)
    report = {"model": args.model, "backend": args.backend, "budget": budget or "none (Pareto front)", "rows": rows,
              "score": f"{len(score)} validation windows × {args.seqlen} (re-scored on {len(rescore)})",
              "final": f"{len(test)} test windows × {args.seqlen}",
              "rejected": max((t.get("rejected_so_far", 0) for t in trials), default=0),
              "mean_eval_seconds": sum(t["eval_seconds"] for t in trials) / len(trials),
              "mean_propose_seconds": sum(t["propose_seconds"] for t in trials) / len(trials),
              "solver_note": f"{space.solver} for every trial and for the final plans (cached per layer and choice)",
              "best": best, "provenance": provenance_record(args, identity, device)}
    write_report(run_dir, report, Store(run_dir).trials())
    if args.json:
        print(json.dumps({k: report[k] for k in ("rows", "budget", "rejected")} | {"best_plan": str(run_dir / "best_plan.yaml")}))
    else:
        print((run_dir / "report.md").read_text())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixq.search.report import write_report
    from mixq.search.study import Store

    run_dir = Path(args.run_dir)
    path = run_dir / "report.json"
    if not path.is_file():
        trials = Store(run_dir).trials()
        if not trials:
            raise MixqError(f"{run_dir} holds no search (no report.json, no trials.jsonl)")
        best = min(trials, key=lambda t: t["ppl"])
        print(f"{len(trials)} trials so far (no final report yet); best ppl on the scoring windows {best['ppl']:.4f} "
              f"at {best['bits_per_weight']:.4f} bits/weight")
        return 0
    write_report(run_dir, json.loads(path.read_text()), Store(run_dir).trials())
    print((run_dir / "report.md").read_text())
    return 0
