"""Every ``mixq`` command shown in README.md runs, made tiny, and exits 0.

The commands are read from the README itself: every line of a ```bash block that starts with
``mixq`` (continuation lines joined, comments dropped), then every inline code span that is a
whole command (``mixq report RUN_DIR``: a sub-command with arguments that the parser accepts;
a fragment such as ``mixq eval --tasks`` is prose).  Each runs through ``mixq.cli.main`` in a
temporary folder (relative outputs land there), in README order, bash blocks first, with:

- a tiny random model for every model (``--model`` replaced, or added where none is given);
- a tiny data directory (the packaged WikiText excerpt and a few zero-shot questions);
- small sizes: options in ``DEFAULTS`` added where the command takes them and none is given,
  values capped by ``CAPS``, options in ``FOLLOW`` added after the README's; ``--device cpu``.

A sub-command missing from ``COMMANDS`` fails its test by name: add a row saying how it runs tiny,
or a row in ``NOT_ON_CPU`` saying why it cannot run here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import byte_tokenizer, tiny_llama
from mixq.cli import build_parser, main
from mixq.data import EXCERPT

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


@dataclass(frozen=True)
class Tiny:
    """How one sub-command runs tiny: the model it loads ("causal", "encoder" or None) and its own
    defaults and caps, over the shared ones."""

    model: str | None
    defaults: dict[str, str | None] = field(default_factory=dict)  # None: a flag without a value
    caps: dict[str, int] = field(default_factory=dict)


COMMANDS = {
    "formats": Tiny(model=None),
    "eval": Tiny(model="causal"),
    "quantize": Tiny(model="causal"),
    "search": Tiny(model="causal", defaults={"--final-limit": "2", "--final-task-limit": "4"}),
    "sensitivity": Tiny(model="causal", defaults={"--max-iter": "2"}),
    "allocate": Tiny(model=None),
    "report": Tiny(model=None),
    "embed-eval": Tiny(model="encoder", defaults={"--limit": "8"}, caps={"--limit": 8, "--nsamples": 4}),
    "generate": Tiny(model="causal", caps={"--max-new-tokens": 4}),
    "plot-weights": Tiny(model="causal"),
    "profile": Tiny(model="causal"),
    "database": Tiny(model="causal"),
    "export": Tiny(model="causal"),
    # on a CPU: fake-quant, every step launched (the README's CUDA commands there, tiny)
    "bench-speed": Tiny(model="causal", defaults={"--new-tokens": "2", "--prompt": "4", "--prefill": "0", "--batch": "1",
                                                  "--no-graphs": None},
                        caps={"--new-tokens": 2, "--prompt": 4, "--prefill": 0}),
}
#: sub-commands that cannot run on a CPU with a tiny model: name -> why (their tests are skipped)
NOT_ON_CPU: dict[str, str] = {}
#: options whose commands cannot run here: option -> why (skipped; each names the test that covers it)
NOT_HERE = {
    "--workers": "starts Ray actors, a few seconds each (tests/test_distributed.py runs them on a local Ray)",
    "--ray-address": "needs a running Ray cluster (tests/test_distributed.py runs a local one)",
    "--random-weights": "builds a model of Llama-3-8B's shapes (16 GB in bf16) for a GPU's kernels",
    "--latency-table": "predicts decode time from a GPU's measurements of the real model's shapes "
                       "(tests/test_search.py: the throughput objective on a table made for the tiny model)",
}
#: added where the command takes the option and the README gives none
DEFAULTS = {"--seqlen": "32", "--limit": "2", "--nsamples": "2", "--trials": "4"}
#: README values capped to these
CAPS = {"--limit": 2, "--nsamples": 2, "--trials": 4, "--task-limit": 4, "--max-iter": 2, "--starts": 2}
#: options added after a README option with this value: QuantEase's 30 sweeps cut to 3
FOLLOW = {("--solver", "quantease"): ["--option", "iterations=3"], ("--solver", "gptq+quantease"): ["--option", "iterations=3"],
          ("--space", "bench/space_quantease.yaml"): ["--option", "iterations=3"]}
#: README placeholders for files an earlier command wrote
VALUES = {"sens.json": "runs/sens.json", "RUN_DIR": "runs/x"}
#: a plan in the choices of bench/space_layer.yaml, for ``--initial my_plan.yaml``
MY_PLAN = "default: {format: int4-g64, solver: rtn}\n"


# -- reading the README ------------------------------------------------------------------------
def block_commands(text: str) -> list[list[str]]:
    """``mixq`` command lines of the ```bash blocks, continuations joined, comments dropped."""
    out = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "mixq":
                out.append(argv)
    return out


def inline_commands(text: str) -> list[list[str]]:
    """Inline code spans outside code blocks that are whole ``mixq`` commands: a sub-command with
    arguments that the parser accepts."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    out = []
    for span in re.findall(r"`(mixq [^`]+)`", prose):
        argv = shlex.split(span)
        if len(argv) < 3:
            continue  # a sub-command named in prose
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                build_parser(argv[1:]).parse_args(argv[1:])
            except SystemExit:
                continue  # a fragment: an option named in prose
        out.append(argv)
    return out


def readme_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    return block_commands(text) + inline_commands(text)


def plan_yaml(text: str) -> str:
    """The README's example plan (its ```yaml block)."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 1, "README.md: expected one ```yaml block (the example plan)"
    return blocks[0]


# -- making a command tiny ----------------------------------------------------------------------
def _options(sub: str, rest: list[str] = ()) -> set[str]:
    """The options of ``mixq SUB`` (of ``mixq SUB ACTION`` for a command with actions: ``database build``)."""
    parser = build_parser([])
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub_parser = action.choices[sub]
    nested = [a for a in sub_parser._actions if isinstance(a, argparse._SubParsersAction)]
    if nested and rest and rest[0] in nested[0].choices:
        sub_parser = nested[0].choices[rest[0]]
    return set(sub_parser._option_string_actions)


def tiny_argv(argv: list[str], models: dict[str, Path], data: Path) -> list[str]:
    """The README command ``argv`` (``mixq SUB ...``) with tiny sizes, models and data, for ``main``."""
    sub = argv[1]
    if sub in NOT_ON_CPU:
        pytest.skip(f"mixq {sub}: {NOT_ON_CPU[sub]}")
    if sub not in COMMANDS:
        pytest.fail(f"README.md shows `{shlex.join(argv)}`: tests/test_readme_tour.py does not know the sub-command "
                    f"{sub!r}; add it to COMMANDS (how it runs tiny) or NOT_ON_CPU (why it cannot run on a CPU)")
    tiny = COMMANDS[sub]
    caps = {**CAPS, **tiny.caps}
    args = argv[2:]
    accepted = _options(sub, args)
    out = [sub]
    given = {a for a in args if a.startswith("--")}
    for opt, why in NOT_HERE.items():
        if opt in given:
            pytest.skip(f"`{shlex.join(argv)}` {why}")
    for i, a in enumerate(args):
        prev = args[i - 1] if i else ""
        if prev in caps and not a.startswith("--"):
            a = str(min(int(a), caps[prev]))
        elif prev == "--model":  # the named models load in tens of seconds on a CPU: tests/test_integration.py
            a = str(models[tiny.model or "causal"])
        elif prev == "--device":
            a = "cpu"
        a = VALUES.get(a, a)
        if prev == "--out":
            out.append(a)  # outputs stay in the tour's folder, even those the README writes under bench/
        else:
            out.append(",".join(str(REPO / x) if x.startswith("bench/") else x for x in a.split(",")))  # repository files
        out += FOLLOW.get((prev, a), [])
    if tiny.model and "--model" not in given and "--model" in accepted:  # not database info
        out += ["--model", str(models[tiny.model])]
    for opt, value in {**DEFAULTS, **tiny.defaults, "--data-dir": str(data), "--device": "cpu"}.items():
        if opt in accepted and opt not in given:
            out += [opt] if value is None else [opt, value]  # None: a flag
    return out


# -- fixtures ----------------------------------------------------------------------------------
MC = [{"query": f"Question {i}: which word follows {w}?", "choices": c, "gold": g} for i, (w, c, g) in enumerate(
    [("red", ["blue", "green"], 0), ("one", ["two", "three"], 1), ("cat", ["dog", "a mouse", "bird"], 2),
     ("up", ["down", "left"], 0), ("hot", ["cold", "warm"], 1), ("day", ["night", "noon"], 0)])]
LM = [{"context": f"The {w} jumped over the", "continuation": c} for w, c in
      [("fox", "dog"), ("cow", "moon"), ("cat", "fence"), ("boy", "wall")]]


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> dict:
    """The folder the commands run in, the tiny models and the tiny data directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tour")
    data = root / "data"
    (data / "zeroshot").mkdir(parents=True)
    for split in ("test", "validation"):
        (data / "wikitext2").mkdir(exist_ok=True)
        shutil.copyfile(str(EXCERPT.joinpath(f"wikitext2/{split}.raw")), data / "wikitext2" / f"{split}.raw")
    for task in ("arc_easy", "piqa", "copa", "openbook_qa", "siqa"):
        (data / "zeroshot" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (data / "zeroshot" / "lambada_openai.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LM))
    # rows of 192 weights: every group and block size in the README's commands and bench/space_layer.yaml fits
    causal = root / "tiny-llama"
    tiny_llama(hidden_size=192, intermediate_size=192).save_pretrained(causal)
    byte_tokenizer().save_pretrained(causal)
    encoder = root / "tiny-bert"
    words = "the a of and to in is was he she it film game song album war city river ship team year first new".split()
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(encoder)
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(encoder)
    work = root / "work"
    work.mkdir()
    (work / "plan.yaml").write_text(plan_yaml(README.read_text(encoding="utf-8")))
    (work / "my_plan.yaml").write_text(MY_PLAN)
    return {"work": work, "data": data, "models": {"causal": causal, "encoder": encoder}}


# -- the tests ---------------------------------------------------------------------------------
COMMAND_LINES = readme_commands()


def test_the_readme_shows_every_command():
    """The extraction finds the tour: a README reformatted out of reach must not pass by running nothing."""
    shown = {argv[1] for argv in COMMAND_LINES}
    assert shown >= {"formats", "eval", "quantize", "search", "sensitivity", "allocate", "report", "embed-eval"}


def test_extraction():
    text = ("x\n```bash\nmixq eval --plan a \\\n    --limit 3   # comment\npip install y\n```\n"
            "prose `mixq eval --tasks` and `mixq search`, `mixq report RUN_DIR`.\n```python\nmixq = 1\n```\n")
    assert block_commands(text) == [["mixq", "eval", "--plan", "a", "--limit", "3"]]
    assert inline_commands(text) == [["mixq", "report", "RUN_DIR"]]


def test_tiny_argv_substitutes_and_caps():
    models, data = {"causal": Path("/m"), "encoder": Path("/e")}, Path("/d")
    argv = tiny_argv(["mixq", "eval", "--plan", "int8", "--limit", "200", "--device", "cuda"], models, data)
    assert argv == ["eval", "--plan", "int8", "--limit", "2", "--device", "cpu", "--model", "/m", "--seqlen", "32",
                    "--nsamples", "2", "--data-dir", "/d"]
    argv = tiny_argv(["mixq", "search", "--space", "bench/space_layer.yaml", "--sens", "sens.json", "--max-bits", "4"],
                     models, data)
    assert argv[:5] == ["search", "--space", str(REPO / "bench/space_layer.yaml"), "--sens", "runs/sens.json"]
    assert tiny_argv(["mixq", "formats"], models, data) == ["formats"]
    assert tiny_argv(["mixq", "eval", "--solver", "quantease"], models, data)[:5] == [
        "eval", "--solver", "quantease", "--option", "iterations=3"]
    with pytest.raises(pytest.fail.Exception, match="does not know the sub-command 'no-such-command'"):
        tiny_argv(["mixq", "no-such-command", "--plan", "int4-g128"], models, data)
    assert tiny_argv(["mixq", "plot-weights", "--out", "bench/results/w.png"], models, data)[:3] == [
        "plot-weights", "--out", "bench/results/w.png"]  # never the repository's own files


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=[f"{i:02d} {' '.join(a[1:4])}" for i, a in enumerate(COMMAND_LINES)])
def test_readme_command_runs(argv, tour, monkeypatch, capsys):
    """One README command, tiny.  Commands share the folder, so later ones read what earlier ones
    wrote (``--sens runs/sens.json``, ``mixq report RUN_DIR``): run the module in order."""
    monkeypatch.chdir(tour["work"])
    monkeypatch.setenv("MIXQ_DATA_DIR", str(tour["data"]))
    tiny = tiny_argv(argv, tour["models"], tour["data"])
    code = main(tiny)
    err = capsys.readouterr().err
    assert code == 0, f"`{shlex.join(argv)}` as `mixq {shlex.join(tiny)}` exited {code}:\n{err[-3000:]}"
