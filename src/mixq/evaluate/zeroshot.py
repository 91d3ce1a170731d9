"""Zero-shot accuracy through lm-eval, in process and offline.

mixq ships lm-eval task YAMLs (``tasks/local_*.yaml``) that read the data directory's
``zeroshot/*.jsonl`` files. They are named ``local_<task>`` so nobody mistakes them for
lm-eval's hub variants (the files follow llm-foundry's layout: ARC/PIQA queries carry no
``Answer:`` suffix, SIQA offers letter choices); ``arc_easy`` on mixq's command line means
``local_arc_easy``. Any other name passes straight to lm-eval (a user with the hub gets its
standard tasks). The model is wrapped with lm-eval's own Hugging Face class, so ``acc``,
``acc_norm`` (length-normalised in characters) and their standard errors are lm-eval's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixq.errors import DataError, MixqError

TASK_DIR = Path(__file__).parent / "tasks"
LOCAL = {"arc_easy": "arc_easy.jsonl", "piqa": "piqa.jsonl", "lambada_openai": "lambada_openai.jsonl",
         "copa": "copa.jsonl", "openbook_qa": "openbook_qa.jsonl", "siqa": "siqa.jsonl"}
PERPLEXITY_TASKS = ("wikitext2",)  # handled by mixq's own perplexity protocol, not lm-eval
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass(frozen=True)
class TaskRef:
    """A task as named on the command line (``label``) and as lm-eval knows it (``name``)."""

    label: str
    name: str
    local: bool


def resolve_tasks(names: list[str], data_dir: str | os.PathLike | None) -> list[TaskRef]:
    """Map command-line names to lm-eval task names; check every local file exists first."""
    from mixq.data import data_dir as resolve_dir

    refs = []
    for label in names:
        short = label[len("local_"):] if label.startswith("local_") else label
        if short in LOCAL:
            root = resolve_dir(data_dir)
            if root is None:
                raise DataError(f"task {label} reads zeroshot/{LOCAL[short]} from the data directory: "
                                "pass --data-dir DIR or set MIXQ_DATA_DIR")
            file = root / "zeroshot" / LOCAL[short]
            if not file.is_file():
                raise DataError(f"task {label}: {file} not found (check --data-dir / MIXQ_DATA_DIR)")
            refs.append(TaskRef(label, f"local_{short}", True))
        elif label.startswith("local_"):
            raise DataError(f"unknown local task {label!r} (local tasks: {', '.join('local_' + t for t in LOCAL)})")
        else:
            refs.append(TaskRef(label, label, False))
    return refs


def offline() -> None:
    """Switch the Hugging Face libraries to offline mode before lm-eval imports them."""
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)


def _task_manager(refs: list[TaskRef], data_dir: str | os.PathLike | None):  # type: ignore[no-untyped-def]
    from lm_eval.tasks import TaskManager

    from mixq.data import data_dir as resolve_dir

    root = resolve_dir(data_dir)
    # Indexing lm-eval's thousands of built-in YAMLs takes seconds; only do it for hub names.
    hub = any(not r.local for r in refs)
    return TaskManager(include_path=str(TASK_DIR), include_defaults=hub,
                       metadata={"data_dir": str(root) if root else None})


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` as ``{"acc": x, "acc_stderr": s}``."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        if filt != "none" or value == "N/A":
            continue
        out[metric] = float(value)
    return out


def evaluate_tasks(model: Any, tokenizer: Any, tasks: list[str], *, data_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 8, device: str = "cpu", add_bos: bool = False,
                   bootstrap_iters: int = 1000) -> dict[str, dict[str, Any]]:
    """Zero-shot metrics per task label: ``{"arc_easy": {"acc", "acc_stderr", "acc_norm", ..., "n"}}``.

    ``limit`` caps the examples of each task (the first N). ``add_bos`` puts the BOS token
    before every context (Gemma-family models need it).
    """
    refs = resolve_tasks(tasks, data_dir)
    if not refs:
        return {}
    offline()
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:  # pragma: no cover - lm-eval is a dependency
        raise MixqError(f"zero-shot tasks need lm-eval (pip install lm-eval): {e}") from None

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, device=device,
              add_bos_token=add_bos)
    manager = _task_manager(refs, data_dir)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval's chatter must not mix with JSON on stdout
            out = evaluator.simple_evaluate(model=lm, tasks=[r.name for r in refs], task_manager=manager, limit=limit,
                                            bootstrap_iters=bootstrap_iters, log_samples=False, num_fewshot=0,
                                            random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                            fewshot_random_seed=0)
    except KeyError as e:
        raise MixqError(f"lm-eval does not know task {e}: local tasks are "
                        f"{', '.join(LOCAL)}; other names must be lm-eval tasks") from None
    results = out["results"]
    table = {}
    for r in refs:
        metrics = _metrics(results[r.name])
        metrics["n"] = int(out["n-samples"][r.name]["effective"])
        metrics["task"] = r.name
        table[r.label] = metrics
    return table
