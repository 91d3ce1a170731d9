"""GGUF export (llama.cpp): each planned weight in the GGUF type whose grid holds its format's
codes and scales exactly, written from the solver's own codes and parameters.

====================  ============  ==========================================================
mixq format           GGUF type     stored
====================  ============  ==========================================================
int8-sym-g32          Q8_0          d = scale, q = code
int4-sym-g32          Q4_0          d = scale, q = code + 8
int5-sym-g32          Q5_0          d = scale, q = code + 16
int4-fmin-g32         Q4_1          d = scale, m = min, q = code + 8
int5-fmin-g32         Q5_1          d = scale, m = min, q = code + 16
q2-k ... q6-k         Q2_K ... Q6_K  the format's own super-blocks (``KQuantFormat.to_ggml``)
not planned           F16 (``float_type``), 1-D tensors F32; with a source GGUF, the source's
                      own bytes wherever the model still holds exactly their values
====================  ============  ==========================================================

Nothing is re-quantized: scales, minimums and codes are the solver's, so the file dequantises
(``gguf.quants.dequantize``) to exactly the fake-quantized model's weights. ggml's Q4_0, Q5_0
and Q8_0 put a block's largest magnitude on their most negative level (d = max / −8); mixq's
symmetric grids stop one level short (±7, ±15, ±127), a subset of the same grid at the same
size, so they map exactly (llama.cpp's own quantizer would also use that level). Any other
format (other group sizes, integer zero points, minifloats, NF, MX...) has no GGUF type: such
layers are refused by name, or written in ``float_type`` with ``float_fallback``.

Names and layout follow llama.cpp's converter (convert_hf_to_gguf.py): tensor names from the
``gguf`` package's map for the architecture, the rows of Llama's attn_q/attn_k permuted to
llama.cpp's rotary layout (``LlamaModel.permute``; a row permutation keeps every block whole),
Gemma's norms stored as 1 + w. Metadata and tokenizer are copied from the source GGUF when the
model came from one; without one they are written from the HF config (Llama, Qwen2, Gemma 3 as
llama.cpp's converter writes them) and tokenizer (byte-level BPE only). The file is written to a
temporary file beside ``out_path`` and renamed at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from torch import nn

from mixq.errors import ExportError, PlanError
from mixq.formats import Format, IntFormat, QTensor
from mixq.formats.kquant import KQuantFormat, fp16_bytes
from mixq.models import matrix_by_name

FLOAT_TYPES = {"f16": QType.F16, "bf16": QType.BF16, "f32": QType.F32}
#: (bits, scheme) of a mixq integer format with groups of 32 -> the GGUF type that stores it exactly
LEGACY = {(8, "sym"): QType.Q8_0, (4, "sym"): QType.Q4_0, (5, "sym"): QType.Q5_0, (4, "fmin"): QType.Q4_1, (5, "fmin"): QType.Q5_1}
GGML_BLOCK = 32  # QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 in ggml-common.h
#: the file's general.file_type (llama.cpp only shows it) from the type holding most weights
FILE_TYPES = {QType.F32: gguf.LlamaFileType.ALL_F32, QType.F16: gguf.LlamaFileType.MOSTLY_F16,
              QType.BF16: gguf.LlamaFileType.MOSTLY_BF16, QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              QType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, QType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
              QType.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, QType.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_M,
              QType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M, QType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
              QType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K}


@dataclass(frozen=True)
class Arch:
    gguf: str  # general.architecture
    permute_qk: bool  # llama.cpp's rotary row order for attn_q / attn_k
    norm_shift: float  # added to every norm weight (Gemma's RMSNorm scales by 1 + w)


#: HF model_type -> how llama.cpp stores it
ARCHS = {"llama": Arch("llama", True, 0.0), "qwen2": Arch("qwen2", False, 0.0), "gemma3_text": Arch("gemma3", False, 1.0)}
GEMMA3_LOCAL_ROPE = 10000.0  # llama.cpp's fixed rotary base of Gemma 3's sliding-window layers


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    size_bytes: int
    types: dict[str, str]  # GGUF tensor name -> GGUF type name
    in_float: tuple[str, ...]  # planned layers written unquantized (float_fallback)


def gguf_type(fmt: Format) -> QType | None:
    """The GGUF type that stores ``fmt``'s codes and parameters exactly (at its own size), or None."""
    if isinstance(fmt, KQuantFormat):
        return QType[fmt.ggml_type]
    if isinstance(fmt, IntFormat) and fmt.group_size == GGML_BLOCK and not fmt.per_tensor:
        return LEGACY.get((fmt.bits, fmt.scheme))
    return None


def pack(fmt: Format, q: QTensor) -> tuple[np.ndarray, QType]:
    """``q``'s bytes as ggml stores its type: uint8 [rows, bytes per row], and that type."""
    qtype = gguf_type(fmt)
    if qtype is None:
        raise ExportError(f"{fmt.name} has no GGUF type")
    if isinstance(fmt, KQuantFormat):
        return fmt.to_ggml(q), qtype
    rows, cols = q.codes.shape
    if cols % GGML_BLOCK:
        raise ExportError(f"{fmt.name}: GGUF's {qtype.name} needs rows that are a multiple of {GGML_BLOCK}, got {cols}")
    n = rows * cols // GGML_BLOCK
    codes = q.codes.detach().cpu().reshape(n, GGML_BLOCK).numpy().astype(np.int16)
    d = fp16_bytes(q.params["scale"])
    if qtype == QType.Q8_0:
        out = np.concatenate([d, codes.astype(np.int8).view(np.uint8)], axis=1)
    else:
        level = (codes + 2 ** (fmt.bits - 1)).astype(np.uint8)  # type: ignore[attr-defined]
        low = level & 0xF
        blocks = [d] + ([fp16_bytes(q.params["min"])] if "min" in q.params else [])
        if fmt.bits == 5:  # type: ignore[attr-defined]
            blocks.append(np.packbits(level >> 4, axis=1, bitorder="little"))  # qh: bit j = level j's fifth bit
        blocks.append(low[:, :16] | low[:, 16:] << 4)
        out = np.concatenate(blocks, axis=1)
    assert out.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return out.reshape(rows, -1), qtype


def llama_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``: each head's rotary halves interleaved."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# -- what goes into the file --------------------------------------------------------------
@dataclass
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # as add_tensor_info takes it (bytes per row for block types)
    dtype: Any  # numpy dtype of the data written
    nbytes: int
    qtype: QType
    numel: int  # weights held
    data: Callable[[], np.ndarray]


def _arch(model: nn.Module) -> Arch:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        raise ExportError(f"GGUF export supports {', '.join(ARCHS)} models, not {model_type!r}")
    return ARCHS[model_type]


def row_refusal(fmt: Format, cols: int) -> str | None:
    """Why GGUF cannot store ``fmt`` on rows of ``cols`` weights (no type, or rows that are not whole
    blocks of it), or None."""
    qtype = gguf_type(fmt)
    if qtype is None:
        return f"{fmt.name}: no GGUF type"
    if cols % gguf.GGML_QUANT_SIZES[qtype][0]:
        return f"{fmt.name}: rows of {cols} are not whole {qtype.name} blocks"
    return None


def unstorable(model: nn.Module, layers: Mapping[str, Any]) -> dict[str, str]:
    """Planned layers GGUF cannot store, each with the reason; refuses a layer whose codes are
    not the model's weight (layers from another model or run)."""
    bad: dict[str, str] = {}
    for name, layer in layers.items():
        fmt, q = layer.spec.format, layer.qtensor
        why = row_refusal(fmt, q.codes.shape[1])
        if why is None and layer.outliers is not None:
            why = f"{fmt.name} with 16-bit outliers: GGUF has no sparse part"
        if why is not None:
            bad[name] = why
        else:
            weight = matrix_by_name(model, name).get()
            if not torch.equal(fmt.dequantize(q).to(weight.dtype).cpu(), weight.detach().cpu()):
                raise ExportError(f"layer {name!r}: the model's weight is not its codes' value "
                                  "(export the model that quantize_ returned these layers for)")
    return bad


def _tensors(model: nn.Module, layers: Mapping[str, Any], arch: Arch, float_layers: set[str], float_type: str,
             source: gguf.GGUFReader | None) -> list[_Tensor]:
    config = model.config
    mapping = gguf.get_tensor_name_map(_model_arch(arch.gguf), config.num_hidden_layers)
    by_param = {id(matrix_by_name(model, n).param): n for n in layers}
    from_source = {t.name: t for t in source.tensors} if source is not None else {}
    out = []
    for hf_name, param in model.named_parameters():
        name = mapping.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for {hf_name!r} in llama.cpp's {arch.gguf} tensor map")
        heads = None
        if arch.permute_qk and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        layer = by_param.get(id(param))
        if layer is not None and layer not in float_layers:
            out.append(_quantized(name, layers[layer], heads))
            continue
        values = param.detach().float().cpu().numpy()
        if heads is not None:
            values = llama_permute(values, heads)
        if arch.norm_shift and name.endswith("norm.weight"):
            values = values + np.float32(arch.norm_shift)
        src = from_source.get(name)
        if src is not None and layer is None and _holds(src, values):
            out.append(_Tensor(name, tuple(src.data.shape), src.data.dtype, src.data.nbytes, src.tensor_type,
                               values.size, lambda s=src: s.data))
        else:
            out.append(_float(name, values, QType.F32 if values.ndim == 1 else FLOAT_TYPES[float_type]))
    return out


def _model_arch(name: str) -> gguf.MODEL_ARCH:
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _quantized(name: str, layer: Any, heads: int | None) -> _Tensor:
    fmt, q = layer.spec.format, layer.qtensor
    qtype = gguf_type(fmt)
    assert qtype is not None
    rows, cols = q.codes.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]

    def data() -> np.ndarray:
        packed, _ = pack(fmt, q)
        return packed if heads is None else np.ascontiguousarray(llama_permute(packed, heads))

    return _Tensor(name, (rows, cols // block * size), np.dtype(np.uint8), rows * cols // block * size, qtype,
                   rows * cols, data)


def _float(name: str, values: np.ndarray, qtype: QType) -> _Tensor:
    if qtype == QType.BF16:
        shape = (*values.shape[:-1], values.shape[-1] * 2)
        return _Tensor(name, shape, np.dtype(np.uint8), values.size * 2, qtype, values.size,
                       lambda: gguf.quants.quantize(values, QType.BF16))
    dtype = np.dtype(np.float16 if qtype == QType.F16 else np.float32)
    return _Tensor(name, values.shape, dtype, values.size * dtype.itemsize, qtype, values.size,
                   lambda: np.ascontiguousarray(values.astype(dtype)))


def _holds(src: Any, values: np.ndarray) -> bool:
    """Whether the source tensor dequantises to exactly ``values`` (in GGUF's layout)."""
    if tuple(int(n) for n in reversed(src.shape)) != values.shape:
        return False
    return bool(np.array_equal(gguf.quants.dequantize(src.data, src.tensor_type).reshape(values.shape), values))


# -- metadata -----------------------------------------------------------------------------
SKIP_FIELDS = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION}


def _copy_metadata(writer: gguf.GGUFWriter, source: gguf.GGUFReader, arch: Arch, config: Any) -> None:
    fields = source.fields
    found = fields[gguf.Keys.General.ARCHITECTURE].contents() if gguf.Keys.General.ARCHITECTURE in fields else None
    if found != arch.gguf:
        raise ExportError(f"the source GGUF is a {found!r} model, this one is {arch.gguf!r}")
    for key, expect in ((gguf.Keys.LLM.BLOCK_COUNT, config.num_hidden_layers),
                        (gguf.Keys.LLM.EMBEDDING_LENGTH, config.hidden_size)):
        key = key.format(arch=arch.gguf)
        if key in fields and fields[key].contents() != expect:
            raise ExportError(f"the source GGUF's {key} is {fields[key].contents()}, the model's {expect}")
    for field in fields.values():
        if field.name.startswith("GGUF.") or field.name in SKIP_FIELDS:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _config_metadata(writer: gguf.GGUFWriter, arch: Arch, config: Any) -> None:
    """The hyper-parameters llama.cpp's converter writes for the architecture (``set_gguf_parameters``)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if arch.gguf == "gemma3":
        local = rope.get("sliding_attention", {})
        if local.get("rope_theta", GEMMA3_LOCAL_ROPE) != GEMMA3_LOCAL_ROPE or local.get("rope_type", "default") != "default":
            raise ExportError(f"gemma3: llama.cpp's sliding-window layers take rope base {GEMMA3_LOCAL_ROPE:g}, "
                              f"this model {local}; pass the source GGUF (source_gguf)")
        rope = rope.get("full_attention", rope)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope.get("rope_type", "default") != "default" or theta is None:
        raise ExportError(f"rope {rope}: only plain rotary embeddings are written from the config; "
                          "pass the source GGUF (source_gguf)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch.gguf == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch.gguf == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            writer.add_sliding_window(config.sliding_window)


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, llama.cpp's ``gpt2`` model) from its tokenizer.json."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError("writing a tokenizer into GGUF from Hugging Face supports byte-level BPE tokenizers; "
                          "pass the source GGUF (source_gguf) for others")
    added = spec.get("added_tokens", [])
    largest = max([*model["vocab"].values(), *(a["id"] for a in added)], default=-1)
    if largest >= vocab_size:
        raise ExportError(f"the tokenizer has token id {largest}, the model's embedding only {vocab_size} rows")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])  # as convert_hf_to_gguf
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    else:  # GGUF has no empty array: scores let a reader derive the (no) merges, as transformers does
        writer.add_token_scores([0.0] * vocab_size)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(getattr(tokenizer, attr))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# -- the export ---------------------------------------------------------------------------
def export_gguf(model: nn.Module, layers: Mapping[str, Any], tokenizer: Any, out_path: str | os.PathLike, *,
                source_gguf: str | os.PathLike | None = None, float_type: str = "f16", float_fallback: bool = False,
                keep_source_types: bool = True, overwrite: bool = False) -> GGUFExport:
    """Write ``model`` (fake-quantized in place by ``mixq.quantize.quantize_``) as one GGUF file.

    ``layers`` is ``QuantizeResult.layers``: each layer's codes and parameters are written in
    the GGUF type of its format (module docstring); every other tensor in ``float_type``
    (``f16``, ``bf16``, ``f32``; 1-D tensors in F32), or, with ``source_gguf`` (the file the
    model was loaded from) and ``keep_source_types``, the source's own bytes where the model
    still holds exactly their values.
    Metadata and tokenizer come from ``source_gguf`` or else from the HF config and
    ``tokenizer``. A plan format GGUF cannot store is refused with the list of its layers,
    unless ``float_fallback`` writes those layers in ``float_type``.
    """
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"unknown float type {float_type!r} (one of {', '.join(FLOAT_TYPES)})")
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (pass overwrite to replace it)")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} is not a folder")
    arch = _arch(model)
    bad = unstorable(model, layers)
    if bad and not float_fallback:
        raise PlanError(f"GGUF cannot store {len(bad)} planned layer(s): "
                        f"{'; '.join(f'{n} ({why})' for n, why in bad.items())} (GGUF types: int8/int4/int5-sym-g32, "
                        f"int4/int5-fmin-g32, q2-k ... q6-k; or write them in {float_type} with float_fallback)")
    float_layers = set(bad)
    source = gguf.GGUFReader(source_gguf) if source_gguf is not None else None
    tensors = _tensors(model, layers, arch, float_layers, float_type, source if keep_source_types else None)
    counts: dict[QType, int] = {}
    for t in tensors:
        if len(t.shape) == 2:
            counts[t.qtype] = counts.get(t.qtype, 0) + t.numel
    main_type = max(counts, key=counts.__getitem__, default=None)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.partial"  # beside out: os.replace stays atomic
    writer = gguf.GGUFWriter(tmp, arch.gguf)
    try:
        if source is not None:
            _copy_metadata(writer, source, arch, model.config)
        else:
            _config_metadata(writer, arch, model.config)
            _tokenizer_metadata(writer, tokenizer, model.config.vocab_size)
        writer.add_file_type(FILE_TYPES.get(main_type, gguf.LlamaFileType.GUESSED))  # type: ignore[arg-type]
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.data())
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    types = {t.name: t.qtype.name for t in tensors}
    return GGUFExport(out, out.stat().st_size, types, tuple(sorted(float_layers)))
