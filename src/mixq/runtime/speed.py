"""Measured inference speed: greedy decode tokens/s, prefill tokens/s, peak memory.

Decode runs the Hugging Face model on a static KV cache.  On CUDA one decode step
(forward, greedy argmax, position increment) is captured once as a CUDA graph and
replayed: no host work or kernel launch overhead between tokens, for every plan alike.
``compile`` first wraps the step in ``torch.compile`` (fusing the elementwise work between
the matmuls; torchao's int8 weight-only path also counts on it to fuse the cast into the
matmul, which inductor did not do at batch 1 on an H200: bench/results/speed_compile_h200.md)
and captures the compiled step.  The timed replays come after warm-up steps (which also run each Triton kernel's
autotuning at this batch size).

``random_model`` builds a model of a known shape with random weights directly on the
device: speed does not depend on the values.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.plan import Plan

#: Llama-architecture shapes (from each model's config.json)
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}
GIB = 2**30


def random_model(shape: str, *, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                 layers: int | None = None, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` (``SHAPES``) with random weights, built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise MixqError(f"unknown model shape {shape!r} (one of {', '.join(SHAPES)})")
    cfg = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise MixqError(f"--layers must be positive, got {layers}")
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    return model.eval()


@dataclass(frozen=True)
class DecodeSpeed:
    batch: int
    steps: int  # timed decode steps
    seconds: float  # for all of them
    prompt: int
    graphs: bool
    compiled: bool

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.steps / self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ms_per_step": self.ms_per_step, "tokens_per_s": self.tokens_per_s}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, *, reps: int) -> float:
    """Seconds for ``reps`` calls of ``fn`` back to back (CUDA events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t


def _cache_argument(model: nn.Module) -> tuple[str, bool]:
    """(keyword of the KV cache, whether ``cache_position`` is taken): it changed within transformers 5.x."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "cache_position" in params


class Decoder:
    """Greedy decode on a static cache, one token per ``step`` for every sequence of the batch."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, *, max_len: int):
        from transformers import StaticCache

        self.model = model
        self.device = prompt.device
        batch, length = prompt.shape
        self.cache_kw, self.takes_position = _cache_argument(model)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        positions = torch.arange(length, device=self.device)
        out = model(input_ids=prompt, position_ids=positions[None].expand(batch, -1), use_cache=True,
                    logits_to_keep=1, **self._cache_kwargs(positions))
        self.tok = out.logits[:, -1].argmax(-1, keepdim=True)
        self.pos = torch.full((batch, 1), length, device=self.device, dtype=torch.long)
        self.cpos = torch.full((1,), length, device=self.device, dtype=torch.long)
        self.max_len = max_len

    def _cache_kwargs(self, cache_position: torch.Tensor) -> dict[str, Any]:
        kw: dict[str, Any] = {self.cache_kw: self.cache}
        if self.takes_position:
            kw["cache_position"] = cache_position
        return kw

    def step(self) -> None:
        out = self.model(input_ids=self.tok, position_ids=self.pos, use_cache=True, **self._cache_kwargs(self.cpos))
        self.tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.cpos.add_(1)


@torch.no_grad()
def decode_speed(model: nn.Module, *, batch: int, prompt: int = 32, steps: int = 128, warmup: int = 4,
                 graphs: bool = True, compile: bool = False, seed: int = 0) -> DecodeSpeed:
    """Decode ``steps`` tokens after ``warmup`` ones (greedy, static cache) and time them."""
    device = next(model.parameters()).device
    if graphs and device.type != "cuda":
        raise MixqError("CUDA graphs need a CUDA model (pass graphs=False / --no-graphs on cpu)")
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)
    dec = Decoder(model, ids, max_len=prompt + 2 * warmup + 1 + steps)
    if compile:
        torch._dynamo.reset()  # every plan and batch compiles afresh, never against the recompile limit
    step: Callable[[], None] = torch.compile(dec.step, dynamic=False) if compile else dec.step
    if graphs:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the capture stream, as torch.cuda.graphs asks
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()  # recorded, not run
        run = graph.replay
        for _ in range(warmup):
            run()
    else:
        run = step
        for _ in range(2 * warmup + 1):
            run()
    _synchronize(device)
    seconds = timed(run, device, reps=steps)
    return DecodeSpeed(batch, steps, seconds, prompt, graphs, compile)


@torch.no_grad()
def prefill_speed(model: nn.Module, *, tokens: int = 2048, reps: int = 3, seed: int = 0) -> dict[str, float]:
    """One sequence of ``tokens`` through the model (no cache, last logits only), eager."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(device)

    def fwd() -> None:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    fwd()  # warm-up (and autotuning at this size)
    _synchronize(device)
    seconds = timed(fwd, device, reps=reps) / reps
    return {"tokens": tokens, "ms": 1000 * seconds, "tokens_per_s": tokens / seconds}


@torch.no_grad()
def plan_speed(model: nn.Module, plan: Plan, *, batches: tuple[int, ...], prompt: int, steps: int, prefill: int,
               backend: str = "auto", required: bool = False, graphs: bool = True, compile: bool = False,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize ``model`` in place with ``plan`` (RTN: speed does not depend on the values), put
    its layers on kernels (on CUDA), and measure decode at each batch, prefill and memory."""
    from mixq.quantize import quantize_
    from mixq.runtime.apply import apply_kernels

    device = next(model.parameters()).device
    # memory the caller holds besides this model (e.g. the base it was copied from), left out of the figures
    others = torch.cuda.memory_allocated(device) - module_bytes(model) if device.type == "cuda" else 0
    size = plan.size_report(model)
    row: dict[str, Any] = {"bits_per_weight": size.bits_per_weight, "size_bytes": size.size_bytes, "kernels": None}
    if plan.rules or plan.default is not None:
        q = quantize_(model, plan.with_solver("rtn"))
        if device.type == "cuda":
            report = apply_kernels(model, q.layers, backend=backend, required=required)
            row["kernels"] = report.to_dict()
            if log:
                log(f"  kernels: {report.counts()}, {len(report.fallback)} layer(s) stay fake-quant")
        del q
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    row["weights_gib"] = (torch.cuda.memory_allocated(device) - others) / GIB if device.type == "cuda" else None
    row["decode"] = {}
    for b in batches:
        d = decode_speed(model, batch=b, prompt=prompt, steps=steps, graphs=graphs, compile=compile)
        row["decode"][str(b)] = d.to_dict()
        if log:
            log(f"  decode batch {b}: {d.tokens_per_s:.1f} tok/s ({d.ms_per_step:.3f} ms/step)")
    row["prefill"] = prefill_speed(model, tokens=prefill) if prefill else None
    if log and row["prefill"]:
        log(f"  prefill {prefill}: {row['prefill']['tokens_per_s']:.0f} tok/s")
    row["peak_gib"] = (torch.cuda.max_memory_allocated(device) - others) / GIB if device.type == "cuda" else None
    return row


def module_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (a tied tensor once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
