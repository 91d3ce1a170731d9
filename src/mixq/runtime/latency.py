"""A latency model for the search: a plan's decode time per step, predicted from measurements.

Measured once per (layer shape, format, kernel, batch): the time of one Linear call inside a
CUDA graph, cycling through enough copies of the weights that none is served from L2.
The rest of the model (attention, norms, embedding, sampling) is measured as the base
model's decode step minus its Linear layers' times.  A plan's predicted step is

    rest(model, batch) + Σ_layers t(shape, format, kernel, batch)

where each layer takes the kernel ``apply_kernels`` would give it (among those the table
was measured with) and a layer no kernel serves, or one the plan leaves alone, counts as
the 16-bit Linear (``BASE``).  Times are stored in JSON keyed by GPU and torch version,
then by ``"{out}x{in}|{format}|{kernel}|{batch}"``.

For the search (``--objective throughput --max-ppl X``): ``LatencyModel.predict(plan)``
gives seconds per step and ``throughput_loss`` the value to minimise with the bound; a space's
``target:`` keeps the formats its kernels serve (``mixq.search.target``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.formats import Format, parse_format
from mixq.plan import Plan
from mixq.runtime.kernels import KERNELS, choose_kernel
from mixq.runtime.speed import module_bytes, timed

TABLE_VERSION = 1
BASE = "bf16"  # the format and kernel name of an unquantized Linear (F.linear in the model's 16-bit dtype)
L2_MULTIPLE = 4  # weights cycled per timing: at least this many times the GPU's L2 cache
CALLS_PER_GRAPH = 64  # Linear calls recorded in one CUDA graph
GRAPH_REPLAYS = 20  # replays timed (after as many for warm-up)

Assignment = Mapping[str, "str | Format | None"]  # layer name -> its format (None: unquantized)


def device_key(device: torch.device | str | None = None) -> str:
    """``"<GPU name>|torch <version>"``: the measurements hold for this pair only."""
    dev = torch.device(device or "cuda")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return f"{name}|torch {torch.__version__}"


def layer_key(shape: tuple[int, int], fmt: str, kernel: str, batch: int) -> str:
    return f"{shape[0]}x{shape[1]}|{fmt}|{kernel}|{batch}"


def rest_key(model: str, batch: int) -> str:
    return f"{model}|{batch}"


@dataclass
class LatencyTable:
    """Measured seconds on one device: per Linear call, and per model's rest of a decode step."""

    device: str
    layers: dict[str, float] = field(default_factory=dict)
    rest: dict[str, float] = field(default_factory=dict)

    def kernels(self) -> set[str]:
        return {k.split("|")[2] for k in self.layers} - {BASE}

    def layer(self, shape: tuple[int, int], fmt: str, kernel: str, batch: int) -> float:
        key = layer_key(shape, fmt, kernel, batch)
        if key not in self.layers:
            raise MixqError(f"latency table ({self.device}) has no measurement {key!r}: run bench/speed.py with this "
                            "shape, format and batch")
        return self.layers[key]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": dict(sorted(self.layers.items())), "rest": dict(sorted(self.rest.items()))}

    def save(self, path: str | Path) -> None:
        """Write (merging with the other devices already in the file)."""
        path = Path(path)
        data = json.loads(path.read_text()) if path.is_file() else {"version": TABLE_VERSION, "devices": {}}
        data["devices"][self.device] = self.to_dict()
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> LatencyTable:
        """The table of ``device`` (a ``device_key``; default: the file's only one)."""
        path = Path(path)
        if not path.is_file():
            raise MixqError(f"latency table not found: {path}")
        data = json.loads(path.read_text())
        if data.get("version") != TABLE_VERSION:
            raise MixqError(f"{path}: latency table version {data.get('version')} (this mixq reads {TABLE_VERSION})")
        devices = data["devices"]
        if device is None:
            if len(devices) != 1:
                raise MixqError(f"{path} holds {len(devices)} devices ({', '.join(devices)}): name one")
            device = next(iter(devices))
        if device not in devices:
            raise MixqError(f"{path} has no measurements for {device!r} (it has {', '.join(devices)})")
        d = devices[device]
        return cls(device, dict(d["layers"]), dict(d["rest"]))


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear of the model (lm_head too, tied or not): name -> (out, in)."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@dataclass(frozen=True)
class LatencyModel:
    """Predicted decode time per step of plans on one model, batch and kernel backend.

    ``model`` is only read to resolve a Plan into layers (it may live on the meta device).
    """

    table: LatencyTable
    shapes: dict[str, tuple[int, int]]  # every Linear: name -> (out, in)
    model_key: str
    batch: int
    backend: str = "auto"
    dtype: torch.dtype = torch.bfloat16
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    @classmethod
    def for_model(cls, table: LatencyTable, model: nn.Module, *, model_key: str, batch: int, backend: str = "auto") -> LatencyModel:
        dtype = next(model.parameters()).dtype
        return cls(table, linear_shapes(model), model_key, batch, backend, dtype, model)

    def assignment(self, plan: Plan | Assignment) -> dict[str, str | None]:
        if isinstance(plan, Plan):
            if self.model is None:
                raise MixqError("this latency model has no model to resolve a plan: pass a layer -> format mapping")
            return {n: s.format.name for n, s in plan.resolve(self.model).items()}
        unknown = [n for n in plan if n not in self.shapes]
        if unknown:
            raise MixqError(f"latency model: {len(unknown)} layer(s) are not Linear layers of the model, e.g. {unknown[0]!r}")
        return {n: None if f is None else parse_format(f).name for n, f in plan.items()}

    def kernel_for(self, shape: tuple[int, int], fmt: str | None) -> str:
        """The kernel a layer of ``shape`` in ``fmt`` runs on (``BASE``: the 16-bit Linear)."""
        if fmt is None:
            return BASE
        kernel, _ = choose_kernel(parse_format(fmt), shape, self.dtype, self.backend, available=self.table.kernels())
        return BASE if kernel is None else kernel.name

    def breakdown(self, plan: Plan | Assignment) -> dict[str, float]:
        """Seconds per layer, and the rest under ``"rest"``."""
        chosen = self.assignment(plan)
        out = {}
        for name, shape in self.shapes.items():
            fmt = chosen.get(name)
            kernel = self.kernel_for(shape, fmt)
            out[name] = self.table.layer(shape, BASE if kernel == BASE else fmt, kernel, self.batch)
        key = rest_key(self.model_key, self.batch)
        if key not in self.table.rest:
            raise MixqError(f"latency table ({self.table.device}) has no rest-of-model time for {key!r}")
        out["rest"] = self.table.rest[key]
        return out

    def predict(self, plan: Plan | Assignment) -> float:
        """Seconds per decode step (one token for each of ``batch`` sequences)."""
        return math.fsum(self.breakdown(plan).values())

    def tokens_per_s(self, plan: Plan | Assignment) -> float:
        return self.batch / self.predict(plan)


def throughput_loss(seconds: float, ppl: float, *, max_ppl: float, base_seconds: float) -> tuple[float, bool]:
    """(loss to minimise, feasible) for ``--objective throughput --max-ppl X``.

    A feasible plan scores ``s / (s + base)`` in (0, 1), increasing with its predicted time;
    one over the bound scores ``1 + ppl / max_ppl - 1`` > 1, so every infeasible trial
    ranks below every feasible one (as ``--min-acc`` does).
    """
    if not (seconds > 0 and base_seconds > 0 and max_ppl > 0):
        raise MixqError(f"throughput loss: times and bound must be positive ({seconds}, {base_seconds}, {max_ppl})")
    if not math.isfinite(ppl) or ppl > max_ppl:
        return 1.0 + (ppl / max_ppl - 1.0 if math.isfinite(ppl) else 1.0), False
    return seconds / (seconds + base_seconds), True


# -- measuring (CUDA) --------------------------------------------------------------------
def _random_layer(shape: tuple[int, int], fmt: str, kernel: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    w = torch.randn(shape, device=device) * 0.02
    if kernel == BASE:
        layer = nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=dtype)
        layer.weight.data.copy_(w)
        return layer
    f = parse_format(fmt)
    return KERNELS[kernel].build(f, f.quantize(w), None, dtype, device)


@torch.no_grad()
def layer_latency(shape: tuple[int, int], fmt: str, kernel: str, batch: int, *, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str = "cuda") -> float:
    """Seconds for one call of a (out, in) Linear on ``[batch, in]`` inputs, on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        raise MixqError("layer latencies are measured on CUDA")
    first = _random_layer(shape, fmt, kernel, dtype=dtype, device=device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(1, math.ceil(L2_MULTIPLE * l2 / max(module_bytes(first), 1)))
    layers = [first] + [copy.deepcopy(first) for _ in range(copies - 1)]
    x = torch.randn(batch, shape[1], device=device, dtype=dtype)
    calls = max(CALLS_PER_GRAPH, copies)

    def run() -> None:
        for i in range(calls):
            layers[i % copies](x)

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        run()  # warm-up: Triton autotuning and compilation happen here, not in the capture
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(GRAPH_REPLAYS):
        graph.replay()
    seconds = timed(graph.replay, device, reps=GRAPH_REPLAYS)
    del graph, layers
    return seconds / (GRAPH_REPLAYS * calls)


def measure_layers(table: LatencyTable, shapes: Iterable[tuple[int, int]], formats: Iterable[str], batches: Iterable[int], *,
                   backend: str = "auto", dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cuda",
                   log: Callable[[str], None] | None = None) -> None:
    """Fill ``table`` for every shape x (BASE + each format's kernel) x batch not yet in it."""
    batches = list(batches)
    for shape in sorted(set(shapes)):
        for fmt in [BASE, *formats]:
            if fmt == BASE:
                kernel = BASE
            else:
                k, _ = choose_kernel(parse_format(fmt), shape, dtype, backend)
                if k is None:
                    continue  # runs as the 16-bit Linear
                kernel = k.name
            for b in batches:
                key = layer_key(shape, fmt, kernel, b)
                if key in table.layers:
                    continue
                table.layers[key] = layer_latency(shape, fmt, kernel, b, dtype=dtype, device=device)
                if log:
                    log(f"  {key}: {1e6 * table.layers[key]:.1f} us")


def record_rest(table: LatencyTable, shapes: Mapping[str, tuple[int, int]], *, model_key: str, batch: int,
                base_step_seconds: float) -> float:
    """The rest of a decode step: the measured base step minus its Linear layers' base times."""
    linear = math.fsum(table.layer(s, BASE, BASE, batch) for s in shapes.values())
    rest = base_step_seconds - linear
    table.rest[rest_key(model_key, batch)] = rest
    return rest
