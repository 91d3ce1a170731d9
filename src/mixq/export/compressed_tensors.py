"""compressed-tensors export (``pack-quantized``), the format vLLM and transformers load.

One ``config_groups`` entry per distinct weight scheme (bits, symmetric or with an integer
zero point, per channel or per group of G, per tensor), each naming its layers in
``targets``.  A layer's ``weight_packed``, ``weight_scale``, ``weight_zero_point`` and
``weight_shape`` come from compressed-tensors' own ``PackedQuantizationCompressor`` fed
with the solver's scales and zero points: the codes it packs are checked to be the
solver's, and its decompression to give back the model's fake-quantized weight bit for bit.

mixq's codes map onto compressed-tensors' grid as they are: both keep signed codes
``[-2^(b-1), 2^(b-1)-1]`` with ``w = (q - z) * s``, mixq's asymmetric zero point already
shifted by ``2^(b-1)`` (integer.py).  What the target cannot hold is refused per layer,
with the reason (``check_layers``), or written in 16 bits with ``fallback_16bit``.

Scales are stored in the model's dtype when it holds mixq's float16 scales exactly
(float16, float32) and in float32 for a bfloat16 model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file
from torch import Tensor, nn

from mixq.errors import ExportError, ModelError
from mixq.export.atomic import atomic_dir
from mixq.export.checkpoint import state_tensors, write_model_files
from mixq.export.report import ExportReport, split_sizes
from mixq.formats import Format, IntFormat
from mixq.models import DTYPES, LoadedModel, ModelSource, matrix_by_name, quantizable_matrices
from mixq.plan import LayerSpec, Plan
from mixq.quantize import QuantizeResult

CT_FORMAT = "pack-quantized"
WEIGHTS_FILE = "model.safetensors"
RECORD = "mixq_export.json"
VLLM_KERNEL_BITS = (4, 8)  # vLLM's Marlin/Machete WNA16 types: uint4b8, uint8b128 and, with zero points, uint4, uint8
MARLIN_GROUP_SIZES = (32, 64, 128)  # vLLM marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES (besides -1, per channel)
SIXTEEN = "16-bit"


@dataclass(frozen=True)
class CTScheme:
    """One compressed-tensors weight scheme."""

    bits: int
    symmetric: bool
    strategy: str  # "channel", "group" or "tensor"
    group_size: int | None = None

    @property
    def label(self) -> str:
        grain = f"group {self.group_size}" if self.strategy == "group" else self.strategy
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {grain}"

    def args(self, scale_dtype: torch.dtype | None = None) -> QuantizationArgs:
        return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy=self.strategy,
                                group_size=self.group_size, scale_dtype=scale_dtype)


@dataclass(frozen=True)
class LayerCheck:
    """What the exporter does with one planned layer."""

    name: str
    format: str
    scheme: CTScheme | None  # None: refused
    reason: str | None = None  # why compressed-tensors or vLLM cannot take it
    notes: tuple[str, ...] = ()  # what vLLM needs beyond what compressed-tensors holds


def scheme_of(fmt: Format, cols: int) -> tuple[CTScheme | None, str | None]:
    """The compressed-tensors scheme of a format on rows of ``cols``, or why there is none."""
    if not isinstance(fmt, IntFormat):
        return None, f"{fmt.name}: pack-quantized holds integer grids only (no minifloat, NF, log or MX elements)"
    if fmt.scheme == "fmin":
        return None, f"{fmt.name}: a 16-bit minimum per group is not an integer zero point"
    if fmt.scheme == "pow2":
        return None, f"{fmt.name}: a shared power-of-two exponent is not a compressed-tensors scale"
    symmetric = fmt.scheme == "sym"
    if fmt.per_tensor:
        return CTScheme(fmt.bits, symmetric, "tensor"), None
    if fmt.group_size is None or fmt.group_size == cols:
        return CTScheme(fmt.bits, symmetric, "channel"), None
    if cols % fmt.group_size:
        return None, (f"{fmt.name}: rows of {cols} end in a group of {cols % fmt.group_size}; compressed-tensors "
                      "and vLLM need the group size to divide the input dimension")
    return CTScheme(fmt.bits, symmetric, "group", fmt.group_size), None


def _vllm_notes(s: CTScheme) -> tuple[str, ...]:
    notes = []
    if s.bits not in VLLM_KERNEL_BITS:
        notes.append(f"vLLM: no Marlin/Machete kernel for {s.bits}-bit weights (4 and 8 bits)")
    if s.strategy == "tensor":
        notes.append("vLLM: its WNA16 scheme takes per-channel or grouped weights, not per-tensor")
    if s.strategy == "group" and s.group_size not in MARLIN_GROUP_SIZES:
        notes.append(f"vLLM: Marlin takes groups of {', '.join(map(str, MARLIN_GROUP_SIZES))}, not {s.group_size}")
    return tuple(notes)


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    """The default-quantized matrices that are a module's own weight (Linear, Conv1D), by name."""
    return {n: m.module for n, m in quantizable_matrices(model).items() if m.attr == "weight"}


def _linears(model: nn.Module) -> list[str]:
    """The default-quantized Linear layers: what pack-quantized stores (Conv1D and experts have no Linear to load into)."""
    return [n for n, m in _modules(model).items() if isinstance(m, nn.Linear)]


def check_layers(model: nn.Module, specs: Mapping[str, LayerSpec]) -> list[LayerCheck]:
    """Per planned layer: its scheme, or why it is refused; fused q/k/v and gate/up must agree."""
    linears = _linears(model)
    checks: dict[str, LayerCheck] = {}
    for name, spec in specs.items():
        opts = spec.opts
        scheme, reason = scheme_of(spec.format, int(matrix_by_name(model, name).shape[1]))
        if name not in linears:
            scheme, reason = None, ("only Linear layers inside the transformer blocks are exported packed "
                                    f"(not {'an expert tensor' if name not in _modules(model) else 'a ' + type(_modules(model)[name]).__name__})")
        elif opts.get("outliers") or opts.get("keep_columns"):
            scheme, reason = None, "16-bit outliers beside the codes have no place in pack-quantized"
        notes = _vllm_notes(scheme) if scheme else ()
        checks[name] = LayerCheck(name, spec.format.name, scheme, reason, notes)
    for group in fused_groups(model):
        kinds = {n: checks[n].scheme.label if n in checks and checks[n].scheme else
                 ("refused" if n in checks else SIXTEEN) for n in group}
        if len(set(kinds.values())) > 1:
            listed = ", ".join(f"{n.rsplit('.', 1)[-1]}: {k}" for n, k in kinds.items())
            why = f"vLLM fuses {', '.join(n.rsplit('.', 1)[-1] for n in group)} and needs one scheme for them ({listed})"
            for n in group:
                if n in checks and checks[n].scheme is not None:
                    checks[n] = LayerCheck(n, checks[n].format, None, why)
    return list(checks.values())


def fused_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The layers vLLM fuses into one (q/k/v, gate/up of each block), by full name."""
    from mixq.search.space import DEFAULT_TIED  # the same groups the search ties

    names = list(_linears(model))
    parents: dict[str, set[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        parents.setdefault(parent, set()).add(leaf)
    return [tuple(f"{p}.{leaf}" for leaf in tied) for p, leaves in parents.items() for tied in DEFAULT_TIED
            if set(tied) <= leaves]


def resolve(model: nn.Module, specs: Mapping[str, LayerSpec], *,
            fallback_16bit: bool) -> tuple[dict[str, CTScheme], list[str], list[LayerCheck]]:
    """(layers written packed -> scheme, layers written in 16 bits, the checks); refuses what it cannot write."""
    checks = check_layers(model, specs)
    refused = [c for c in checks if c.scheme is None]
    if refused and not fallback_16bit:
        raise ExportError(refusal_message(refused))
    fallback = {c.name for c in refused}
    while True:  # a fused group with a member in 16 bits goes to 16 bits whole
        kept = {n: s for n, s in specs.items() if n not in fallback}
        again = [c for c in check_layers(model, kept) if c.scheme is None]
        if not again:
            break
        fallback |= {c.name for c in again}
    packed = {c.name: c.scheme for c in checks if c.name not in fallback and c.scheme is not None}
    return packed, [n for n in specs if n in fallback], checks


def refusal_message(refused: list[LayerCheck]) -> str:
    by_reason: dict[str, list[str]] = {}
    for c in refused:
        by_reason.setdefault(c.reason or "", []).append(c.name)
    parts = [f"{reason} [{len(names)}: {', '.join(names)}]" for reason, names in by_reason.items()]
    return (f"compressed-tensors cannot hold {len(refused)} planned layer(s) (--fallback-16bit writes them in 16 bits): "
            + "; ".join(parts))


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float16 and float32 hold mixq's float16 scales exactly; bfloat16 does not."""
    return dtype if dtype in (torch.float16, torch.float32) else torch.float32


def export_compressed_tensors(model: nn.Module, result: QuantizeResult, plan: Plan, out: str | os.PathLike, *,
                              tokenizer: Any = None, fallback_16bit: bool = False,
                              overwrite: bool = False) -> ExportReport:
    """Write ``model`` (fake-quantized by ``quantize_(model, plan)``, which returned ``result``) to ``out``."""
    specs = {n: layer.spec for n, layer in result.layers.items()}
    packed, fallback, checks = resolve(model, specs, fallback_16bit=fallback_16bit)
    dtype = next(model.parameters()).dtype
    scale_dtype = scale_dtype_for(dtype)
    groups: dict[CTScheme, list[str]] = {}
    compressed: dict[str, Tensor] = {}
    for name, scheme in packed.items():
        groups.setdefault(scheme, []).append(name)
        for key, t in compress_layer(name, result, scheme, model, scale_dtype).items():
            compressed[f"{name}.{key}"] = t
    dense, _ = state_tensors(model, skip={f"{n}.weight" for n in packed})  # tied tensors are re-tied from config
    arg_dtype = None if scale_dtype == dtype else scale_dtype
    config = QuantizationConfig(
        config_groups={f"group_{i}": QuantizationScheme(targets=names, weights=s.args(arg_dtype), format=CT_FORMAT)
                       for i, (s, names) in enumerate(groups.items())},
        format=CT_FORMAT, quantization_status="compressed", ignore=[])
    notes = sorted({f"{note} ({sum(note in c.notes for c in checks if c.name in packed)} layers)"
                    for c in checks if c.name in packed for note in c.notes})
    if dtype == torch.bfloat16:
        notes.append("scales are float32: transformers and vLLM keep scales in the bfloat16 activation dtype and so "
                     "round mixq's float16 scales (mixq.load reads them exactly; export a float16 model to serve it)")
    load = transformers_load(list(groups))
    record = {"mixq": _version(), "plan": plan.to_dict(), "fallback_16bit": fallback, "transformers": load,
              "schemes": {s.label: names for s, names in groups.items()}, "notes": notes}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model_files(model, tokenizer, tmp)
        if groups:
            ModelCompressor(quantization_config=config).update_config(str(tmp))
        save_file({**{k: t.contiguous() for k, t in dense.items()}, **compressed}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
    tensor_bytes, other_bytes = split_sizes(Path(out))
    return ExportReport("compressed-tensors", Path(out), plan.size_bytes(model), tensor_bytes, other_bytes,
                        len(packed), tuple(fallback), tuple(notes), {"transformers": load})


def compress_layer(name: str, result: QuantizeResult, scheme: CTScheme, model: nn.Module,
                   scale_dtype: torch.dtype) -> dict[str, Tensor]:
    """The layer's compressed-tensors tensors, from the solver's codes, scales and zero points."""
    q = result.layers[name].qtensor
    fmt = result.layers[name].spec.format
    args = scheme.args()
    ct_scheme = QuantizationScheme(targets=[name], weights=args, format=CT_FORMAT)
    shape = (-1,) if scheme.strategy == "tensor" else tuple(q.params["scale"].shape)  # CT keeps one scale per tensor as [1]
    state = {"weight": fmt.dequantize(q).float().cpu(), "weight_scale": q.params["scale"].float().cpu().reshape(shape)}
    if not scheme.symmetric:
        state["weight_zero_point"] = q.params["zero"].cpu().reshape(shape).to(torch.int8)
    out = PackedQuantizationCompressor.compress(state, ct_scheme)  # (w/s + z) of w = (q - z)s: the codes exactly
    codes = unpack_from_int32(out["weight_packed"], scheme.bits, out["weight_shape"])
    if not torch.equal(codes, q.codes.cpu().to(torch.int8)):
        raise ExportError(f"layer {name!r}: compressed-tensors packed other codes than the solver's")
    out["weight_scale"] = out["weight_scale"].to(scale_dtype)
    weight = matrix_by_name(model, name).get().detach().cpu()
    back = PackedQuantizationCompressor.decompress(out, ct_scheme)["weight"].to(weight.dtype)
    if not torch.equal(back, weight):
        diff = float((back.float() - weight.float()).abs().max())
        raise ExportError(f"layer {name!r}: compressed-tensors would not give back the model's weight "
                          f"(max diff {diff:.3g}); export the model that quantize_ returned these codes for")
    return out


def transformers_load(schemes: list[CTScheme]) -> str:
    """How transformers (5.x, compressed-tensors 0.20) loads a checkpoint with these schemes, if it can.

    Its default path sizes each asymmetric zero point unpacked, against the packed one in
    the file (and in vLLM); its ``dequantize=True`` path decompresses every layer with the
    first config group's scheme.
    """
    if all(s.symmetric for s in schemes):
        return "AutoModelForCausalLM.from_pretrained(DIR)"
    if len(schemes) == 1:
        return "AutoModelForCausalLM.from_pretrained(DIR, quantization_config=CompressedTensorsConfig(dequantize=True))"
    return "not by transformers (several schemes with zero points); mixq.load(DIR) decompresses it with compressed-tensors"


def _version() -> str:
    from mixq import __version__

    return __version__


# -- reading --------------------------------------------------------------------------------
def load_compressed_tensors(source: str | os.PathLike | ModelSource, *, dtype: str | None = None,
                            device: str = "cpu") -> LoadedModel:
    """A pack-quantized folder decompressed layer by layer with its own config group's scheme,
    through compressed-tensors' decompressor (whatever transformers' loader manages)."""
    from compressed_tensors.utils.match import match_named_modules
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from mixq.export.checkpoint import load_tokenizer

    if not isinstance(source, ModelSource):
        source = ModelSource(str(source), Path(source))
    folder = source.path
    config = AutoConfig.from_pretrained(folder)
    qdict = getattr(config, "quantization_config", None)
    qdict = dict(qdict.to_dict() if hasattr(qdict, "to_dict") else qdict or {})
    try:
        qconfig = QuantizationConfig.model_validate({k: v for k, v in qdict.items() if k != "quant_method"})
    except ValueError as e:
        raise ModelError(f"{folder}: unreadable compressed-tensors quantization_config ({str(e).splitlines()[0]})") from None
    del config.quantization_config  # the model is built plain; its weights arrive decompressed
    name = dtype or str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r} (one of {', '.join(DTYPES)})")
    torch_dtype = DTYPES[name]
    tensors: dict[str, Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            tensors.update(load_file(str(f)))
        except (OSError, SafetensorError) as e:
            raise ModelError(f"{f}: unreadable safetensors file ({e})") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state: dict[str, Tensor] = {}
    for group in qconfig.config_groups.values():
        if not isinstance(group, QuantizationScheme) or group.weights is None or group.weights.type != "int" \
                or group.input_activations is not None or (group.format or qconfig.format) != CT_FORMAT:
            raise ModelError(f"{folder}: only weight-only integer pack-quantized schemes are read here")
        for mname, _ in match_named_modules(model, group.targets, qconfig.ignore):
            local = {k[len(mname) + 1:]: tensors.pop(k) for k in list(tensors) if k.startswith(f"{mname}.weight_")}
            if "weight_packed" not in local:
                raise ModelError(f"{folder}: layer {mname!r} has no weight_packed tensor")
            state[f"{mname}.weight"] = PackedQuantizationCompressor.decompress(local, group)["weight"].to(torch_dtype)
    state.update(tensors)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ModelError(f"{folder}: the checkpoint does not fit the model ({str(e).splitlines()[0]})") from None
    lost = sorted(set(missing) - set(state_tensors(model, skip=set())[1]))  # tied tensors come with their twin
    if unexpected or lost:
        what = f"unexpected tensor {unexpected[0]!r}" if unexpected else f"tensor {lost[0]!r} missing"
        raise ModelError(f"{folder}: the checkpoint does not fit the model ({what})")
    model.to(device).eval()
    return LoadedModel(model, load_tokenizer(folder), source)
