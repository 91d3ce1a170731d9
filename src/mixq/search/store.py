"""The run directory of a study: config, space, trials.jsonl (one JSON object per finished trial), study.db."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixq.errors import MixqError
from mixq.search.space import SearchSpace


class Store:
    """The run directory: config, space, trials.jsonl, study.db, best plans, report."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.trials_path = run_dir / "trials.jsonl"

    def storage_url(self) -> str:
        return f"sqlite:///{(self.dir / 'study.db').resolve()}"

    def write_meta(self, meta: dict[str, Any], space: SearchSpace, resume: bool) -> None:
        path = self.dir / "config.json"
        if resume:
            if not path.is_file():
                raise MixqError(f"--resume: {self.dir} holds no study (no config.json)")
            old = json.loads(path.read_text())
            for key in ("model_sha256", "space", "objective", "max_bits", "max_size", "seqlen", "limit", "tasks",
                        "task_limit", "task_metric", "min_acc", "database"):
                if old.get(key) != meta.get(key):
                    raise MixqError(f"--resume: {self.dir} was made with another {key} "
                                    f"({old.get(key)!r}, now {meta.get(key)!r}); use a new --run-dir")
            return
        if path.exists() or self.trials_path.exists():
            raise MixqError(f"{self.dir} already holds a study; pass --resume to continue it or choose another --run-dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "space.yaml").write_text(json.dumps(space.to_dict(), indent=2))
        path.write_text(json.dumps(meta, indent=2))

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        with self.trials_path.open("a") as fh:  # one write per trial; a torn last line is skipped on read
            fh.write(line)
            fh.flush()

    def trials(self) -> list[dict[str, Any]]:
        if not self.trials_path.is_file():
            return []
        out = []
        for line in self.trials_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
        return out


__all__ = ["Store"]
