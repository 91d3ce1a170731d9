"""mixq's own checkpoint: every format's packed codes, group parameters and outliers in
safetensors beside a manifest; ``load_checkpoint`` rebuilds the fake-quantized model exactly.

    DIR/mixq_checkpoint.json   the manifest: format version, mixq version, dtype, the plan;
                               per layer its format, solver, shape, group size and how each
                               of its tensors is stored; per tensor its file, dtype, shape, sha256
    DIR/quantized.safetensors  per quantized layer: codes packed at the format's code width
                               (pack.py), group parameters at the width the plan counts them
                               (16-bit scales and minima, zero points packed at the code width,
                               8-bit shared exponents), outliers (CSR or whole columns)
    DIR/dense.safetensors      every other tensor (tied tensors once)
    DIR/config.json, tokenizer files

"16-bit" tensors (the dense ones, outlier values) keep a 16-bit model's dtype; from a
float32 model each is stored in float16 or bfloat16 when that holds it exactly, else in
float32 (and the manifest and the export report say so).  Loading dequantises each layer
once into the model's dtype, ``decode(codes, params)`` in float32 as ``quantize_`` computes
it, cast, with the outliers written over it; every tensor's bytes are checked against the
manifest first, and a missing, truncated or altered tensor is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mixq.errors import ExportError, MixqError, ModelError
from mixq.export.atomic import atomic_dir
from mixq.export.pack import pack_bits, unpack_bits
from mixq.export.report import ExportReport, split_sizes
from mixq.formats import QTensor, parse_format
from mixq.models import DTYPES, LoadedModel, ModelSource, Matrix, matrix_by_name
from mixq.plan import Plan
from mixq.quantize import QuantizedLayer, QuantizeResult

MANIFEST = "mixq_checkpoint.json"
FORMAT_NAME = "mixq-checkpoint"
VERSION = 1
QUANTIZED_FILE = "quantized.safetensors"
DENSE_FILE = "dense.safetensors"
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "U16": torch.uint16, "BOOL": torch.bool}
_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


# -- writing --------------------------------------------------------------------------------
def export_checkpoint(model: nn.Module, result: QuantizeResult, plan: Plan, out: str | os.PathLike, *,
                      tokenizer: Any = None, overwrite: bool = False) -> ExportReport:
    """Write ``model`` (fake-quantized by ``quantize_(model, plan)``, which returned ``result``) to ``out``."""
    dtype = next(model.parameters()).dtype
    quantized: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    for name, layer in result.layers.items():
        matrix = matrix_by_name(model, name)
        entry, tensors = encode_layer(name, layer, matrix.get().detach())
        entry.update(_placement(name, matrix))
        layers[name] = entry
        quantized.update(tensors)
    dense, aliases = state_tensors(model, skip={e["weight"] for e in layers.values()})
    dense_entries: dict[str, Any] = {}
    stored_dense: dict[str, Tensor] = {}
    for key, t in dense.items():
        dense_entries[key], stored_dense[key] = _sixteen_bit(key, t, dtype)
    stored = {**quantized, **stored_dense}
    wide = [k for k, t in stored.items() if t.is_floating_point() and t.dtype not in SIXTEEN_BIT]
    get = stored.__getitem__
    for name, entry in layers.items():  # the checkpoint must give back the model's weights bit for bit
        got = layer_weight(entry, get, dtype)
        want = matrix_by_name(model, name).get().detach().cpu()
        if not torch.equal(got, want):
            diff = float((got.float() - want.float()).abs().max())
            raise ExportError(f"layer {name!r}: its codes do not reproduce the model's weight (max diff {diff:.3g}); "
                              "export the model that quantize_ returned these codes for")
    files = {QUANTIZED_FILE: quantized, DENSE_FILE: stored_dense}
    manifest = {
        "format": FORMAT_NAME, "version": VERSION, "mixq": _mixq_version(), "dtype": str(dtype).removeprefix("torch."),
        "plan": plan.to_dict(), "size": plan.size_report(model).to_dict(), "layers": layers,
        "dense": dense_entries, "aliases": aliases,
        "tensors": {k: _tensor_record(fname, t) for fname, ts in files.items() for k, t in ts.items()},
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model_files(model, tokenizer, tmp)
        for fname, tensors in files.items():
            if tensors:
                save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / fname), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    tensor_bytes, other_bytes = split_sizes(Path(out))
    notes = (f"{len(wide)} tensor(s) kept in 32 bits, which 16 bits would change (export a 16-bit model): "
             + ", ".join(wide[:5]) + (", ..." if len(wide) > 5 else ""),) if wide else ()
    return ExportReport("mixq", Path(out), plan.size_bytes(model), tensor_bytes, other_bytes, len(layers), notes=notes)


def _placement(name: str, matrix: Matrix) -> dict[str, Any]:
    """Where a layer's [out, in] matrix goes in the state dict: the parameter's key, the expert
    index within a stacked parameter, and whether the parameter stores it transposed (Conv1D)."""
    key = name.rpartition(".")[0] if matrix.index is not None else f"{name}.{matrix.attr}"
    return {"weight": key, "index": matrix.index, "transposed": matrix.transposed}


def state_tensors(model: nn.Module, *, skip: set[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every state-dict tensor but ``skip``, tied tensors once: (key -> tensor, alias -> key it shares)."""
    first: dict[int, str] = {}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[key] = first[id(t)]
            continue
        first[id(t)] = key
        if key not in skip:
            tensors[key] = t.detach().cpu()
    return tensors, aliases


def write_model_files(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """config.json (and generation_config.json, tokenizer files where there are any) into ``folder``."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def encode_layer(name: str, layer: QuantizedLayer, weight: Tensor) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A quantized layer's manifest entry and stored tensors; ``weight`` is the model's (fake-quantized) weight."""
    q = layer.qtensor
    fmt = parse_format(q.fmt)
    bits = fmt.code_bits
    tensors: dict[str, Tensor] = {}
    codes = q.codes.detach().cpu()
    signed = codes.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)
    entry: dict[str, Any] = {
        "format": fmt.name, "solver": layer.spec.solver, "options": layer.spec.opts,
        "shape": list(codes.shape), "group_size": q.group_size,
        "codes": _packed(f"{name}.codes", codes, bits, 2 ** (bits - 1) if signed else 0, tensors),
        "params": {},
    }
    param_bits = getattr(fmt, "param_bits", lambda _: None)  # integer parameters a format counts at a width
    for pname, value in q.params.items():
        key = f"{name}.{pname}"
        value = value.detach().cpu()
        width = param_bits(pname)
        if width and _integral(value):  # e.g. k-quants' 4/6/8-bit sub-block scales (signed ones stored offset)
            entry["params"][pname] = _packed(key, value, width, 2 ** (width - 1) if value.min() < 0 else 0, tensors)
        elif pname == "zero" and _integral(value):  # integer zero points, counted at the code width
            entry["params"][pname] = _packed(key, value, bits, 2 ** (bits - 1), tensors)
        elif pname == "exp" and _integral(value) and value.abs().max() <= 127:  # E8M0 shared exponents
            entry["params"][pname] = {"tensor": key, "dtype": _dtype_name(value), "shape": list(value.shape)}
            tensors[key] = value.to(torch.int8)
        else:
            entry["params"][pname], tensors[key] = _sixteen_bit(key, value, torch.float32)
    if layer.outliers is not None:
        entry["outliers"] = _encode_outliers(name, layer, weight.cpu(), tensors)
    return entry, tensors


def _encode_outliers(name: str, layer: QuantizedLayer, weight: Tensor, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The final weights where the sparse part is non-zero: whole columns (structured outliers,
    GPTQ's keep_columns) or CSR, as ``Plan.size_report`` counts them."""
    where = layer.outliers.detach().cpu() != 0
    opts = layer.spec.opts
    if opts.get("structured") or opts.get("keep_columns"):
        idx = where.any(dim=0).nonzero().flatten()
        tensors[f"{name}.outliers.columns"] = idx.to(torch.int32)
        values, tensors[f"{name}.outliers.values"] = _sixteen_bit(f"{name}.outliers.values", weight[:, idx], weight.dtype)
        return {"kind": "columns", "columns": f"{name}.outliers.columns", "values": values}
    rows, cols = where.shape
    crow = torch.zeros(rows + 1, dtype=torch.int32)
    crow[1:] = where.sum(dim=1).cumsum(0)
    col = where.nonzero()[:, 1]
    tensors[f"{name}.outliers.crow"] = crow
    tensors[f"{name}.outliers.col"] = col.to(torch.uint16 if cols <= 2**16 else torch.int32)  # 16-bit index as counted
    values, tensors[f"{name}.outliers.values"] = _sixteen_bit(f"{name}.outliers.values", weight[where], weight.dtype)
    return {"kind": "sparse", "crow": f"{name}.outliers.crow", "col": f"{name}.outliers.col", "values": values}


def _packed(key: str, value: Tensor, bits: int, offset: int, tensors: dict[str, Tensor]) -> dict[str, Any]:
    try:
        tensors[key] = pack_bits(value.to(torch.int32) + offset, bits)
    except ValueError as e:
        raise ExportError(f"{key}: cannot pack at {bits} bits: {e}") from None
    return {"tensor": key, "bits": bits, "offset": offset, "dtype": _dtype_name(value), "shape": list(value.shape)}


def _sixteen_bit(key: str, t: Tensor, dtype: torch.dtype) -> tuple[dict[str, Any], Tensor]:
    """A float tensor in the model's 16-bit dtype, or the narrowest float that holds it exactly."""
    entry = {"tensor": key, "dtype": _dtype_name(t), "shape": list(t.shape)}
    if not t.is_floating_point() or t.dtype in SIXTEEN_BIT:
        return entry, t
    for narrow in ((dtype,) if dtype in SIXTEEN_BIT else ()) + SIXTEEN_BIT:
        n = t.to(narrow)
        if torch.equal(n.to(t.dtype), t):
            return entry, n
    return entry, t


def _integral(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all()) and torch.equal(t, t.round())


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor_record(fname: str, t: Tensor) -> dict[str, Any]:
    return {"file": fname, "dtype": _dtype_name(t), "shape": list(t.shape), "sha256": hashlib.sha256(_bytes(t)).hexdigest()}


def _bytes(t: Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _mixq_version() -> str:
    from mixq import __version__

    return __version__


# -- reading --------------------------------------------------------------------------------
def layer_weight(entry: dict[str, Any], get: Any, dtype: torch.dtype) -> Tensor:
    """A layer's weight in ``dtype`` from its manifest entry; ``get(key)`` returns a stored tensor."""
    fmt = parse_format(entry["format"])
    codes = _restore(entry["codes"], get)
    params = {n: _restore(e, get) for n, e in entry["params"].items()}
    w = fmt.dequantize(QTensor(fmt.name, codes, params, int(entry["group_size"]))).to(dtype)
    out = entry.get("outliers")
    if out is not None:
        values = _restore(out["values"], get).to(dtype)
        if out["kind"] == "columns":
            w[:, get(out["columns"]).long()] = values
        else:
            counts = get(out["crow"]).long().diff()
            rows = torch.repeat_interleave(torch.arange(w.shape[0]), counts)
            w[rows, get(out["col"]).long()] = values
    return w


def _restore(entry: dict[str, Any], get: Any) -> Tensor:
    shape = [int(s) for s in entry["shape"]]
    stored = get(entry["tensor"])
    if "bits" in entry:
        count = 1
        for s in shape:
            count *= s
        values = unpack_bits(stored, int(entry["bits"]), count).to(torch.int32) - int(entry["offset"])
        return values.to(getattr(torch, entry["dtype"])).reshape(shape)
    return stored.to(getattr(torch, entry["dtype"])).reshape(shape)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{file}: not a readable mixq checkpoint manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ModelError(f"{file}: not a mixq checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise ModelError(f"{file}: checkpoint version {manifest.get('version')} (this mixq reads {VERSION})")
    return manifest


def read_tensors(path: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """Every tensor the manifest lists, each checked against its dtype, shape and sha256."""
    folder = Path(path)
    by_file: dict[str, list[str]] = {}
    for key, rec in manifest["tensors"].items():
        by_file.setdefault(rec["file"], []).append(key)
    out: dict[str, Tensor] = {}
    for fname, keys in by_file.items():
        out.update(_read_file(folder / fname, {k: manifest["tensors"][k] for k in keys}))
    return out


def _read_file(file: Path, records: dict[str, dict[str, Any]]) -> dict[str, Tensor]:
    first = next(iter(records))
    if not file.is_file():
        raise ModelError(f"checkpoint {file.parent}: {file.name} is missing (tensor {first!r} and "
                         f"{len(records) - 1} others)")
    size = file.stat().st_size
    out: dict[str, Tensor] = {}
    with file.open("rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = _header(fh, n, size)
        if header is None:
            raise ModelError(f"checkpoint {file.parent}: {file.name} is truncated or not safetensors "
                             f"(tensor {first!r} unreadable)")
        data_start = 8 + n
        for key, rec in records.items():
            info = header.get(key)
            if info is None:
                raise ModelError(f"checkpoint {file.parent}: tensor {key!r} is missing from {file.name}")
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None or str(dtype).removeprefix("torch.") != rec["dtype"] or info.get("shape") != rec["shape"]:
                raise ModelError(f"checkpoint {file.parent}: tensor {key!r} in {file.name} does not match the manifest "
                                 f"({info.get('dtype')} {info.get('shape')} against {rec['dtype']} {rec['shape']})")
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise ModelError(f"checkpoint {file.parent}: tensor {key!r} is truncated in {file.name} "
                                 f"({size} bytes, it ends at {data_start + end})")
            fh.seek(data_start + begin)
            raw = fh.read(end - begin)
            if hashlib.sha256(raw).hexdigest() != rec["sha256"]:
                raise ModelError(f"checkpoint {file.parent}: tensor {key!r} in {file.name} does not match its sha256 "
                                 "(the file was altered or corrupted)")
            t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            out[key] = t.reshape(rec["shape"])
    return out


def _header(fh: Any, n: int, size: int) -> dict[str, Any] | None:
    if not 0 < n <= min(_HEADER_LIMIT, size - 8):
        return None
    try:
        header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def load_checkpoint(source: str | os.PathLike | ModelSource, *, dtype: str | None = None,
                    device: str = "cpu") -> LoadedModel:
    """The fake-quantized model a checkpoint holds, in its export dtype unless ``dtype`` says otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(source, ModelSource):
        source = ModelSource(str(source), Path(source))
    manifest = read_manifest(source.path)
    name = dtype or manifest["dtype"]
    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r} (one of {', '.join(DTYPES)})")
    torch_dtype = DTYPES[name]
    stored = read_tensors(source.path, manifest)
    get = stored.__getitem__
    state: dict[str, Tensor] = {key: _restore(e, get) for key, e in manifest["dense"].items()}
    experts: dict[str, dict[int, Tensor]] = {}
    for entry in manifest["layers"].values():
        try:
            w = layer_weight(entry, get, torch_dtype)
        except MixqError as e:
            raise ModelError(f"checkpoint {source.path}: layer {entry['weight']!r}: {e}") from None
        w = w.T.contiguous() if entry.get("transposed") else w
        if entry.get("index") is None:
            state[entry["weight"]] = w
        else:  # one expert of a stacked parameter
            experts.setdefault(entry["weight"], {})[int(entry["index"])] = w
    for key, parts in experts.items():
        state[key] = torch.stack([parts[e] for e in range(len(parts))])
    for alias, key in manifest["aliases"].items():
        state[alias] = state[key]
    try:
        config = AutoConfig.from_pretrained(source.path)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        model.load_state_dict(state, strict=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot rebuild the model of checkpoint {source.path}: {first}") from None
    model.to(device).eval()
    return LoadedModel(model, load_tokenizer(source.path), source)


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(folder)
