"""Mixed-precision search on a layer database of SmolLM2-135M, in one command (one H200: about 8 minutes, estimated).

    python3 bench/database_gpu.py --model /root/models/SmolLM2-135M-Instruct.Q4_1.gguf --data-dir DATA --out OUT

1. the GGUF is dequantised once into an fp16 Hugging Face folder in the work folder (every later process
   loads that in seconds instead of dequantising again);
2. the layer database: every Linear layer at every choice of ``--space`` (QuantEase) and of
   ``--compare`` (RTN, GPTQ, QuantEase with outliers: for the per-choice error table), on
   ``--nsamples`` × ``--seqlen`` calibration windows (``mixq database build``); meanwhile the uniform
   fronts: every ``--front-formats`` format with every ``--front-solvers`` solver, solved sequentially
   (the protocol of the solver tables) on the full test split (``mixq eval``);
3. the measured sensitivity of the database's weights (``mixq sensitivity --db``), for the guided starts;
4. TPE and Ax studies at every ``--budgets`` budget, at once on the one GPU (``mixq search --db``): each
   re-solves its best plans sequentially, keeps the better solution on validation and reports both
   on the test split;
5. the first study's best plan re-evaluated from its plan file (``mixq eval --plan best_plan.yaml``
   with the calibration the file names): the reported perplexity must come back exactly;
6. OUT/database_gpu.json, OUT/database_gpu.md (the tables, the command, the hardware, the date),
   OUT/database_front.png (bits vs perplexity: the fronts and the searched plans) and
   OUT/database_best_vs_trial.png (Ax and TPE side by side at each budget), OUT/database_runs.tar.gz
   (every report, trial log and plan) and OUT/database_log.txt.

Trial counts, budgets, choices and sizes are flags, so the run can be fitted to the time at hand; a
CPU check of the script runs the same steps on a tiny model with tiny sizes (see ``--help``).
Needs on the GPU machine: gguf (to read the GGUF file), optuna, ax-platform and their dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INT4_G128_BYTES = 112_023_936  # SmolLM2-135M under uniform int4-g128 (bench/results/eval_speed_h100.md)
TARGETS = {f"size:{INT4_G128_BYTES}": 23.4, "bits:3.25": 31.0, "bits:3.5": 29.0}  # issue 12's targets (test ppl)
FRONT_FORMATS = "int2-g64,int3-g128,int3-g64,int3-g32,int4-g128,int4-g64,int4-g32,int5-g128,int6-g128,int8"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a .gguf file or a Hugging Face folder")
    ap.add_argument("--data-dir", required=True, help="holds wikitext2/{validation,test}.raw")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default OUT/work); a database there is reused")
    ap.add_argument("--space", default=str(ROOT / "bench/space_quantease.yaml"), help="the searched space")
    ap.add_argument("--compare", default=str(ROOT / "bench/space_compare.yaml"),
                    help="extra choices solved into the database for the error table ('' for none)")
    ap.add_argument("--budgets", default=",".join(TARGETS), help="size:BYTES or bits:B, comma-separated")
    ap.add_argument("--backends", default="tpe,ax")
    ap.add_argument("--tpe-trials", type=int, default=300)
    ap.add_argument("--ax-trials", type=int, default=60)
    ap.add_argument("--starts", type=int, default=4, help="guided starts per study")
    ap.add_argument("--sequential-top", type=int, default=2, help="best plans of each study also solved sequentially")
    ap.add_argument("--front-formats", default=FRONT_FORMATS)
    ap.add_argument("--front-solvers", default="rtn,gptq,quantease")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows (database, sequential solves)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=4, help="scoring windows per trial")
    ap.add_argument("--final-limit", type=int, default=None, help="test windows (default: the full test split)")
    ap.add_argument("--sens-nsamples", type=int, default=4, help="windows of the measured sensitivity")
    ap.add_argument("--sens-seqlen", type=int, default=1024)
    ap.add_argument("--calib-dataset", default="wikitext2", help="calibration text (a file for the CPU check)")
    ap.add_argument("--device", default=None, help="default: cuda")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    out = args.out.resolve()
    work = (args.work or out / "work").resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "database_log.txt").open("w")
    start = time.time()

    def say(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - start:5.0f} s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}

    def mixq(name: str, *argv: str, threads: int | None = None) -> subprocess.Popen:
        e = {**env, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        cmd = [args.python, "-m", "mixq.cli", *argv]
        say(f"start {name}: {shlex.join(cmd[2:])}")
        with (work / "logs" / f"{name}.log").open("w") as fh:
            fh.write(shlex.join(cmd) + "\n")
        return subprocess.Popen(cmd, env=e, stdout=(work / "logs" / f"{name}.out").open("w"),
                                stderr=(work / "logs" / f"{name}.log").open("a"))

    def wait(name: str, proc: subprocess.Popen) -> bool:
        ok = proc.wait() == 0
        say(f"{name} {'done' if ok else 'FAILED (exit code %d)' % proc.returncode}")
        if not ok:
            tail = (work / "logs" / f"{name}.log").read_text().splitlines()[-15:]
            for line in tail:
                say(f"  | {line}")
        return ok

    device = ["--device", args.device] if args.device else []
    data = ["--data-dir", args.data_dir]
    calib = ["--calib-dataset", args.calib_dataset, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    final = ["--final-limit", str(args.final_limit)] if args.final_limit else []
    cores = os.cpu_count() or 4
    results: dict[str, Any] = {"command": shlex.join(["python3", "bench/database_gpu.py", *sys.argv[1:]]),
                               "model": Path(args.model).name,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": cores}

    # 1. the model, dequantised once
    model = _hf_folder(args.model, work / "model", say, results)
    m = ["--model", str(model)]

    # 2. the database, and meanwhile the uniform fronts (sequential solves)
    db = work / "db"
    spaces = ["--space", args.space] + (["--space", args.compare] if args.compare else [])
    build = mixq("database_build", "database", "build", *m, *spaces, "--db", str(db), *data, *calib, *device, "--json",
                 threads=max(1, cores // 2))
    fronts = {}
    for solver in [s for s in args.front_solvers.split(",") if s]:
        fronts[solver] = mixq(f"front_{solver}", "eval", *m, "--plan", args.front_formats, "--solver", solver, *data,
                              *calib, *device, *(["--limit", str(args.final_limit)] if args.final_limit else []),
                              "--json", threads=max(1, cores // 4))
    if not wait("database_build", build):
        return 1
    results["database"] = json.loads(_last_line(work / "logs" / "database_build.out"))
    results["database"]["choices"] = _choice_table(db)

    # 3. the measured sensitivity of the database's weights
    from mixq.search.space import SearchSpace

    space = SearchSpace.load(args.space)
    sens = work / "sens.json"
    opts = [x for k, v in space.options for x in ("--option", f"{k}={json.dumps(v)}")]
    sens_proc = mixq("sensitivity", "sensitivity", *m, "--method", "measured", "--formats", ",".join(space.choices),
                     "--solver", space.solver, *opts, "--db", str(db), *data, "--calib-dataset", args.calib_dataset,
                     "--nsamples", str(args.sens_nsamples), "--seqlen", str(args.sens_seqlen), "--out", str(sens),
                     *device, "--json")
    if not wait("sensitivity", sens_proc):
        return 1
    results["sensitivity_seconds"] = json.loads(sens.read_text()).get("seconds", {}).get("measured")

    # 4. the studies, at once
    studies = {}
    budgets = [b for b in args.budgets.split(",") if b]
    backends = [b for b in args.backends.split(",") if b]
    for budget in budgets:
        kind, value = budget.split(":")
        flag = ["--max-size", value] if kind == "size" else ["--max-bits", value]
        for backend in backends:
            name = f"{backend}_{kind}{value}"
            trials = args.tpe_trials if backend != "ax" else args.ax_trials
            studies[name] = (budget, backend, mixq(
                name, "search", *m, "--space", args.space, "--db", str(db), "--backend", backend, "--trials", str(trials),
                *flag, "--sens", str(sens), "--starts", str(args.starts), "--sequential-top", str(args.sequential_top), "--limit", str(args.limit), *final, *data,
                *calib, *device, "--run-dir", str(work / name), "--json",
                threads=max(1, cores // (len(budgets) * len(backends)))))
    done = {name: (b, k) for name, (b, k, proc) in studies.items() if wait(name, proc)}
    for solver, proc in fronts.items():
        if wait(f"front_{solver}", proc):
            rows = [json.loads(x) for x in (work / "logs" / f"front_{solver}.out").read_text().splitlines() if x.startswith("{")]
            results.setdefault("fronts", {})[solver] = [{k: r[k] for k in ("label", "ppl", "bits_per_weight", "size_bytes",
                                                                         "quantize_seconds")} for r in rows]
    results["studies"] = {name: _study(work / name, budget, backend) for name, (budget, backend) in done.items()}

    # 5. the first study's best plan from its file: the reported perplexity must come back
    if done:
        name = next(iter(done))
        s = results["studies"][name]
        mode = s["kept"]["solution"]
        check = mixq("reproduce", "eval", *m, "--plan", str(work / name / "best_plan.yaml"), "--calibration-mode", mode,
                     *data, *calib, *device, *(["--limit", str(args.final_limit)] if args.final_limit else []), "--json")
        if wait("reproduce", check):
            ppl = json.loads(_last_line(work / "logs" / "reproduce.out"))["ppl"]
            results["reproduce"] = {"study": name, "solution": mode, "reported_ppl": s["kept"]["ppl"], "plan_file_ppl": ppl,
                                    "equal": ppl == s["kept"]["ppl"]}
    results["seconds"] = time.time() - start
    results["hardware"] = _hardware()
    out.mkdir(parents=True, exist_ok=True)
    (out / "database_gpu.json").write_text(json.dumps(results, indent=2))
    _plots(results, work, out)
    (out / "database_gpu.md").write_text(_markdown(results))
    with tarfile.open(out / "database_runs.tar.gz", "w:gz") as tar:
        for name in done:
            for f in ("report.json", "report.md", "trials.jsonl", "best_plan.yaml"):
                if (work / name / f).is_file():
                    tar.add(work / name / f, arcname=f"{name}/{f}")
        tar.add(sens, arcname="sens.json")
        tar.add(work / "logs", arcname="logs")
    say(f"total {time.time() - start:.0f} s; {out}: {' '.join(sorted(p.name for p in out.iterdir()))}")
    return 0 if len(done) == len(studies) else 1


def _hf_folder(model: str, folder: Path, say: Any, results: dict[str, Any]) -> Path:
    """The model as a Hugging Face folder (a GGUF file dequantised once, saved in fp16)."""
    if not model.endswith(".gguf"):
        return Path(model)
    if (folder / "config.json").is_file():
        say(f"model: reusing {folder}")
        return folder
    sys.path.insert(0, str(ROOT / "src"))
    from mixq.commands.quantize import save_model
    from mixq.models import load_model

    t = time.time()
    loaded = load_model(model, dtype="float16")
    save_model(loaded.model, loaded.tokenizer, folder)
    results["gguf"] = {"file": model, "sha256": loaded.identity()["sha256"], "dequantise_seconds": time.time() - t}
    say(f"model: {model} dequantised into {folder} ({time.time() - t:.0f} s)")
    return folder


def _last_line(path: Path) -> str:
    return [x for x in path.read_text().splitlines() if x.startswith("{")][-1]


def _choice_table(db: Path) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "src"))
    from mixq.commands.database import choice_summary
    from mixq.database import LayerDatabase

    return choice_summary(LayerDatabase.open(db, LayerDatabase.read_key(db)))


def _study(run: Path, budget: str, backend: str) -> dict[str, Any]:
    report = json.loads((run / "report.json").read_text())
    trials = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines() if x.strip()]
    rows = {r["label"]: r for r in report["rows"]}
    pick = lambda prefix: next((r for label, r in rows.items() if label.startswith(prefix)), None)  # noqa: E731
    kept = next(r for label, r in rows.items() if "(kept" in label)
    best = report["best"]
    return {"budget": budget, "backend": backend, "trials": len(trials), "units": report["units"],
            "trials_per_second": 1 / report["mean_eval_seconds"],
            "trials_per_second_with_proposals": len(trials) / sum(t["eval_seconds"] + t["propose_seconds"] for t in trials),
            "mean_propose_seconds": report["mean_propose_seconds"], "rejected": report["rejected"],
            "independent": pick("best searched plan, independent"), "sequential": pick("best searched plan, sequential"),
            "kept": {**kept, "solution": best["solution"]}, "guided": pick("start: guided"),
            "uniform": pick("heuristic: largest uniform"),
            "uniform_sequential": next((r for label, r in rows.items()
                                        if label.startswith("heuristic") and label.endswith(", sequential")), None),
            "base": pick("base"), "sequential_candidates": report.get("sequential"),
            "best_vs_trial": _best_so_far(trials), "first_proposal": next((i for i, t in enumerate(trials)
                                                                          if t["source"] != "initial"), None),
            "best_plan_solve_seconds": report["database"]["best_plan_solve_seconds"]}


def _best_so_far(trials: list[dict[str, Any]]) -> list[float]:
    best, out = float("inf"), []
    for t in trials:
        best = min(best, t["ppl"])
        out.append(best)
    return out


def _hardware() -> dict[str, Any]:
    try:
        import torch

        if torch.cuda.is_available():
            return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
        return {"device": "cpu", "torch": torch.__version__}
    except ImportError:
        return {}


def _plots(results: dict[str, Any], work: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for solver, rows in results.get("fronts", {}).items():
        pts = sorted((r["bits_per_weight"], r["ppl"]) for r in rows)
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"uniform {solver} (sequential)")
    markers = {"independent": "^", "sequential": "v"}
    for name, s in results.get("studies", {}).items():
        for solution, mk in markers.items():
            r = s.get(solution)
            if r is not None:
                ax.scatter(r["bits_per_weight"], r["ppl"], marker=mk, s=40, label=f"{name}, {solution}")
    for budget, target in TARGETS.items():  # a size budget at the bits of the plans searched under it
        kind, value = budget.split(":")
        bits = [s["kept"]["bits_per_weight"] for s in results.get("studies", {}).values() if s["budget"] == budget]
        if kind == "bits" or bits:
            ax.scatter(float(value) if kind == "bits" else max(bits), target, marker="*", color="k", s=60)
    base = next((s["base"]["ppl"] for s in results.get("studies", {}).values() if s.get("base")), None)
    if base is not None:
        ax.axhline(base, color="gray", linestyle=":", label="base (16-bit)")
    ax.set_yscale("log")
    ax.set_ylim(top=80 if base is not None and base < 40 else None)
    ax.set_xlim(2, 8.5)
    ax.set_xlabel("bits per weight (codes, scales, zero points, outliers)")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.set_title("uniform fronts and searched plans (stars: the issue's targets)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "database_front.png", dpi=130)
    plt.close(fig)
    budgets = list(dict.fromkeys(s["budget"] for s in results.get("studies", {}).values()))
    if not budgets:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for name, s in results["studies"].items():
            if s["budget"] == budget:
                curve = s["best_vs_trial"]
                line, = ax.plot(range(1, len(curve) + 1), curve, label=f"{s['backend']} ({s['trials']} trials)")
                if s["first_proposal"] is not None:
                    ax.axvline(s["first_proposal"] + 1, color=line.get_color(), linestyle=":", alpha=0.6)
        finite = [v for s in results["studies"].values() if s["budget"] == budget for v in s["best_vs_trial"][-1:]]
        if finite:
            ax.set_ylim(min(finite) * 0.98, min(finite) * 1.3)
        ax.set_title(f"budget {budget}", fontsize=9)
        ax.set_xlabel("trial (dotted: the first proposal after the starts)")
        ax.set_ylabel("best validation ppl so far (scoring windows)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "database_best_vs_trial.png", dpi=120)
    plt.close(fig)


def _markdown(r: dict[str, Any]) -> str:
    db = r["database"]
    hw = r.get("hardware", {})
    lines = [f"# Search on a layer database, {r['model']}, {hw.get('device', '?')} ({r['started'][:10]})", "",
             f"Command: `{r['command']}` ({r['seconds'] / 60:.1f} minutes in all, {r['cpus']} CPU cores, torch "
             f"{hw.get('torch', '?')}). Perplexity on the WikiText-2 test split (2048-token windows unless the command "
             "says otherwise); bits per weight count codes, scales, zero points and outliers.", "",
             f"**Layer database**: {db['entries']} entries, {db['disk_bytes'] / 1e6:.0f} MB on disk, {db['built']} built in "
             f"{db['build_seconds']:.0f} s (one calibration pass for the Grams of the base model, "
             f"{db['key']['calibration']['nsamples']} × {db['key']['calibration']['seqlen']} tokens, then every (layer, "
             f"choice) solved alone). Measured sensitivity of its weights: {r.get('sensitivity_seconds') or 0:.0f} s.", "",
             "## Per choice (mean over the layers; relative error ‖WX−ŴX‖²/‖WX‖² on the calibration Grams)", "",
             "| format | solver | options | bits/weight | error | RTN's | ratio | solve s |", "|---|---|---|---|---|---|---|---|"]
    for c in db["choices"]:
        lines.append(f"| {c['format']} | {c['solver']} | {c['options']} | {c['bits_per_weight']:.4f} | {c['rel_error']:.3e} "
                     f"| {c['rtn_rel_error']:.3e} | {c['ratio']:.3f} | {c['seconds']:.1f} |")
    lines += ["", "## Searched plans against the targets", "",
              "| study | budget | trials | trials/s | guided start | best, independent | best, sequential | kept | target |",
              "|---|---|---|---|---|---|---|---|---|"]
    cell = lambda x: "—" if x is None else f"{x['ppl']:.3f} ({x['bits_per_weight']:.3f} b/w)"  # noqa: E731
    for name, s in r.get("studies", {}).items():
        target = TARGETS.get(s["budget"])
        met = "" if target is None else f"≤ {target}: {'met' if s['kept']['ppl'] <= target else 'missed'}"
        lines.append(f"| {name} | {s['budget']} | {s['trials']} | {s['trials_per_second']:.1f} "
                     f"({s['trials_per_second_with_proposals']:.1f} with proposals) | {cell(s['guided'])} | "
                     f"{cell(s['independent'])} | {cell(s['sequential'])} | {s['kept']['solution']} | {met} |")
    lines += ["", "Uniform baselines in each study (the largest uniform choice that fits): "
              + "; ".join(f"{name}: {cell(s['uniform'])} independent, {cell(s['uniform_sequential'])} sequential"
                          for name, s in r.get("studies", {}).items()) + ".", ""]
    if "fronts" in r:
        formats = [row["label"] for row in next(iter(r["fronts"].values()))]
        lines += ["## Uniform fronts (sequential solves)", "", "| format | bits/weight | " + " | ".join(r["fronts"]) + " |",
                  "|---|---|" + "---|" * len(r["fronts"])]
        for i, f in enumerate(formats):
            bits = next(iter(r["fronts"].values()))[i]["bits_per_weight"]
            lines.append(f"| {f} | {bits:.4f} | " + " | ".join(f"{rows[i]['ppl']:.3f}" for rows in r["fronts"].values()) + " |")
        lines.append("")
    if "reproduce" in r:
        x = r["reproduce"]
        lines += [f"Reproduction: {x['study']}'s best_plan.yaml ({x['solution']} solution) through `mixq eval --plan` gives "
                  f"{x['plan_file_ppl']:.6f} against the reported {x['reported_ppl']:.6f} "
                  f"({'equal' if x['equal'] else 'NOT equal'}).", ""]
    lines += ["![fronts](database_front.png)", "", "![best vs trial](database_best_vs_trial.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
