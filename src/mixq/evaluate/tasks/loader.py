"""Dataset loader for mixq's local zero-shot task YAMLs (lm-eval ``custom_dataset``).

lm-eval calls ``load(**metadata, **dataset_kwargs)``; mixq passes the data directory as
metadata (``data_dir``) and each YAML names its file. Rows are read from the JSONL file
into an in-memory ``datasets.Dataset``: nothing is downloaded or cached on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def rows(path: Path, kind: str) -> list[dict[str, Any]]:
    """The task's rows; language-modelling rows get ``target`` = continuation with its separator.

    The separator rule (data README): one space between context and continuation unless the
    context already ends in white space.
    """
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{i + 1}: not a JSON object") from None
        if kind == "lm":
            ctx = doc["context"]
            sep = "" if ctx[-1:].isspace() else " "
            out.append({"context": ctx, "target": sep + doc["continuation"]})
        else:
            out.append({"query": doc["query"], "choices": list(doc["choices"]), "gold": int(doc["gold"])})
    return out


def load(*, file: str, kind: str = "mc", data_dir: str | None = None, **_: Any):  # type: ignore[no-untyped-def]
    import datasets

    if data_dir is None:
        raise ValueError("mixq local tasks need the data directory as metadata 'data_dir'")
    path = Path(data_dir) / "zeroshot" / file
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows(path, kind))})
