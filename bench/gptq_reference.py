"""GPTQ as its authors' code runs it, against mixq's GPTQ: same model load, same calibration
windows, same evaluation, one process.

    python bench/gptq_reference.py --model smollm2-135m --data-dir DATA \\
        --settings int4:pc,int4:g128,int3:g128,int4:g128:act --out bench/results/gptq_reference.json

A setting is ``int{BITS}:{pc|gN}[:FLAG...]`` with flags ``act`` (act-order with static
groups), ``static`` (static groups), ``sSEED`` (this calibration draw instead of ``--seed``) and ``ts`` (true-sequential, both pipelines; the
reference's default, and this script's, is not true-sequential).  For each setting the
reference pipeline (a) and mixq's ``quantize_`` with solver ``gptq`` (b) run on the same
calibration windows from the base weights, which are restored after each run; both
quantized models are scored by ``mixq.evaluate.perplexity`` (``--reference-eval`` adds the
reference's layer-by-layer ``llama_eval``).  Rows: setting, both perplexities, relative gap
(ours / reference - 1), both quantization times, and where the quantized weights differ
(per layer of the first block, then per block: largest difference, share of codes that
differ).  GPTQ is chaotic: one code that differs early changes every later error update,
and a block whose inputs differ gets other codes, so read the first block (same inputs for
both, unless true-sequential) and the ``-rev`` variants before the perplexity gap.

Reference
---------
``Quantizer`` and ``quantize`` (quant.py), ``GPTQ`` (gptq.py), ``find_layers``
(modelutils.py), ``get_wikitext2`` (datautils.py), ``llama_sequential`` and ``llama_eval``
(llama.py) below are ports of https://github.com/IST-DASLab/gptq by Elias Frantar, Saleh
Ashkboos, Torsten Hoefler and Dan Alistarh ("GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023), Apache License 2.0.  Kept as written:
the asymmetric min-max grid with a float32 scale and an integer zero point, the Gram
accumulation (``H *= n / (n + 1); H += 2/n · x xᵀ``, one sequence at a time, in float32),
``fasterquant`` (damping 0.01 of the mean diagonal, blocks of 128, groups refitted on
``W`` when a group starts, static groups, act-order), one sequence per layer call, every
layer of a block calibrated before any of it is quantized unless true-sequential, the
block's outputs recomputed on its quantized weights.  Changed, and only for these reasons:

* current transformers computes the rotary embedding once per model: the catcher keeps
  ``position_embeddings`` and ``position_ids`` beside ``attention_mask`` and every layer
  call passes them; a decoder layer may return a tensor rather than a tuple;
* the module-level ``args`` became parameters; the catcher raises ``StopForward`` rather
  than ``ValueError``; prints, ``DEBUG`` and the Conv branches are gone;
* layers go back to the model's own device rather than to the CPU (``.cpu()``);
* calibration is drawn from the validation split read from the data directory (rows
  rebuilt by ``mixq.data.wikitext_text``), tokenized as datautils does;
* diagnostics, off by default (``--ref-variants``): ``fp16`` rounds the reference's scales
  to float16 as mixq stores them, to isolate that one difference; ``-rev`` feeds the same
  windows in reverse order, which changes only the rounding of the Gram sums, to measure
  how far float noise alone moves the reference.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from mixq.data import calibration_windows, load_text, tokenize, windows
from mixq.evaluate import perplexity
from mixq.models import load_model
from mixq.plan import Plan
from mixq.provenance import provenance
from mixq.quantize import quantize_


# -- quant.py ---------------------------------------------------------------------------------
def quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


class Quantizer(nn.Module):
    def __init__(self, shape=1):
        super().__init__()
        self.register_buffer("maxq", torch.tensor(0))
        self.register_buffer("scale", torch.zeros(shape))
        self.register_buffer("zero", torch.zeros(shape))
        self.fp16_scale = False  # diagnostic only: round scales as mixq stores them

    def configure(self, bits, perchannel=False, sym=True, mse=False, norm=2.4, grid=100, maxshrink=0.8):
        self.maxq = torch.tensor(2**bits - 1)
        self.perchannel = perchannel
        self.sym = sym
        self.mse = mse
        self.norm = norm
        self.grid = grid
        self.maxshrink = maxshrink

    def find_params(self, x, weight=False):
        dev = x.device
        self.maxq = self.maxq.to(dev)

        shape = x.shape
        if self.perchannel:
            if weight:
                x = x.flatten(1)
            else:
                if len(shape) == 4:
                    x = x.permute([1, 0, 2, 3])
                    x = x.flatten(1)
                if len(shape) == 3:
                    x = x.reshape((-1, shape[-1])).t()
                if len(shape) == 2:
                    x = x.t()
        else:
            x = x.flatten().unsqueeze(0)

        tmp = torch.zeros(x.shape[0], device=dev)
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)

        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            tmp = xmin < 0
            if torch.any(tmp):
                xmin[tmp] = -xmax[tmp]
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1

        self.scale = (xmax - xmin) / self.maxq
        if self.fp16_scale:
            self.scale = self.scale.half().float()
        if self.sym:
            self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = torch.round(-xmin / self.scale)

        if self.mse:
            best = torch.full([x.shape[0]], float("inf"), device=dev)
            for i in range(int(self.maxshrink * self.grid)):
                p = 1 - i / self.grid
                xmin1 = p * xmin
                xmax1 = p * xmax
                scale1 = (xmax1 - xmin1) / self.maxq
                zero1 = torch.round(-xmin1 / scale1) if not self.sym else self.zero
                q = quantize(x, scale1.unsqueeze(1), zero1.unsqueeze(1), self.maxq)
                q -= x
                q.abs_()
                q.pow_(self.norm)
                err = torch.sum(q, 1)
                tmp = err < best
                if torch.any(tmp):
                    best[tmp] = err[tmp]
                    self.scale[tmp] = scale1[tmp]
                    self.zero[tmp] = zero1[tmp]
        if not self.perchannel:
            tmp = shape[0] if weight else (shape[1] if len(shape) != 3 else shape[2])
            self.scale = self.scale.repeat(tmp)
            self.zero = self.zero.repeat(tmp)

        if weight:
            shape = [-1] + [1] * (len(shape) - 1)
            self.scale = self.scale.reshape(shape)
            self.zero = self.zero.reshape(shape)
            return
        if len(shape) == 4:
            self.scale = self.scale.reshape((1, -1, 1, 1))
            self.zero = self.zero.reshape((1, -1, 1, 1))
        if len(shape) == 3:
            self.scale = self.scale.reshape((1, 1, -1))
            self.zero = self.zero.reshape((1, 1, -1))
        if len(shape) == 2:
            self.scale = self.scale.unsqueeze(0)
            self.zero = self.zero.unsqueeze(0)

    def quantize(self, x):
        if self.ready():
            return quantize(x, self.scale, self.zero, self.maxq)
        return x

    def enabled(self):
        return self.maxq > 0

    def ready(self):
        return torch.all(self.scale != 0)


# -- gptq.py ----------------------------------------------------------------------------------
class GPTQ:
    def __init__(self, layer):
        self.layer = layer
        self.dev = self.layer.weight.device
        W = layer.weight.data.clone()
        self.rows = W.shape[0]
        self.columns = W.shape[1]
        self.H = torch.zeros((self.columns, self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterquant(self, blocksize=128, percdamp=0.01, groupsize=-1, actorder=False, static_groups=False):
        W = self.layer.weight.data.clone()
        W = W.float()

        if not self.quantizer.ready():
            self.quantizer.find_params(W, weight=True)

        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        if static_groups:
            groups = []
            for i in range(0, self.columns, groupsize):
                quantizer = copy.deepcopy(self.quantizer)
                quantizer.find_params(W[:, i : (i + groupsize)], weight=True)
                groups.append(quantizer)

        if actorder:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
            invperm = torch.argsort(perm)

        Losses = torch.zeros_like(W)
        Q = torch.zeros_like(W)

        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns, device=self.dev)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1

            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]

                if groupsize != -1:
                    if not static_groups:
                        if (i1 + i) % groupsize == 0:
                            self.quantizer.find_params(W[:, (i1 + i) : (i1 + i + groupsize)], weight=True)
                    else:
                        idx = i1 + i
                        if actorder:
                            idx = perm[idx]
                        self.quantizer = groups[idx // groupsize]

                q = quantize(w.unsqueeze(1), self.quantizer.scale, self.quantizer.zero, self.quantizer.maxq).flatten()
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2

                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1

            Q[:, i1:i2] = Q1
            Losses[:, i1:i2] = Losses1 / 2

            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

        if actorder:
            Q = Q[:, invperm]

        self.layer.weight.data = Q.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)

    def free(self):
        self.H = None
        self.Losses = None
        self.Trace = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- modelutils.py, datautils.py --------------------------------------------------------------
def find_layers(module, layers=(nn.Conv2d, nn.Linear), name=""):
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(child, layers=layers, name=name + "." + name1 if name != "" else name1))
    return res


def get_wikitext2(nsamples, seed, seqlen, tokenizer, data_dir):
    """datautils.get_wikitext2 on the validation split (the issue's protocol), test for eval."""
    trainenc = tokenizer(load_text("wikitext2", "validation", root=data_dir), return_tensors="pt")
    testenc = tokenizer(load_text("wikitext2", "test", root=data_dir), return_tensors="pt")

    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        inp = trainenc.input_ids[:, i:j]
        tar = inp.clone()
        tar[:, :-1] = -100
        trainloader.append((inp, tar))
    return trainloader, testenc


# -- llama.py ---------------------------------------------------------------------------------
class StopForward(Exception):
    """Raised by the catcher once the first layer's input is stored."""


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


def _catch_inputs(model, batches, dev, nsamples, seqlen):
    """The Catcher of llama_sequential/llama_eval: layer 0's inputs and keyword arguments."""
    layers = model.model.layers
    dtype = next(iter(model.parameters())).dtype
    inps = torch.zeros((nsamples, seqlen, model.config.hidden_size), dtype=dtype, device=dev)
    cache = {"i": 0, "attention_mask": None, "position_ids": None, "position_embeddings": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["attention_mask"] = kwargs.get("attention_mask")
            cache["position_ids"] = kwargs.get("position_ids")
            cache["position_embeddings"] = kwargs.get("position_embeddings")
            raise StopForward

    layers[0] = Catcher(layers[0])
    for batch in batches:
        try:
            model(batch.to(dev))
        except StopForward:
            pass
    layers[0] = layers[0].module
    kwargs = {"attention_mask": cache["attention_mask"], "position_ids": cache["position_ids"],
              "position_embeddings": cache["position_embeddings"]}
    return inps, kwargs


@torch.no_grad()
def llama_sequential(model, dataloader, dev, *, wbits, groupsize=-1, act_order=False, static_groups=False,
                     true_sequential=False, percdamp=0.01, sym=False, fp16_scale=False):
    nsamples, seqlen = len(dataloader), dataloader[0][0].shape[1]
    home = next(model.parameters()).device
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.layers

    model.model.embed_tokens = model.model.embed_tokens.to(dev)
    model.model.norm = model.model.norm.to(dev)
    model.model.rotary_emb = model.model.rotary_emb.to(dev)
    layers[0] = layers[0].to(dev)
    inps, layer_kwargs = _catch_inputs(model, [b[0] for b in dataloader], dev, nsamples, seqlen)
    layers[0] = layers[0].to(home)
    model.model.embed_tokens = model.model.embed_tokens.to(home)
    model.model.norm = model.model.norm.to(home)

    outs = torch.zeros_like(inps)
    quantizers = {}
    for i in range(len(layers)):
        layer = layers[i].to(dev)
        full = find_layers(layer)

        if true_sequential:
            sequential = [
                ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
                ["self_attn.o_proj"],
                ["mlp.up_proj", "mlp.gate_proj"],
                ["mlp.down_proj"],
            ]
        else:
            sequential = [list(full.keys())]

        for names in sequential:
            subset = {n: full[n] for n in names}

            gptq = {}
            for name in subset:
                gptq[name] = GPTQ(subset[name])
                gptq[name].quantizer = Quantizer()
                gptq[name].quantizer.configure(wbits, perchannel=True, sym=sym, mse=False)
                gptq[name].quantizer.fp16_scale = fp16_scale

            def add_batch(name):
                def tmp(_, inp, out):
                    gptq[name].add_batch(inp[0].data, out.data)
                return tmp

            handles = []
            for name in subset:
                handles.append(subset[name].register_forward_hook(add_batch(name)))
            for j in range(nsamples):
                outs[j] = _first(layer(inps[j].unsqueeze(0), **layer_kwargs))[0]
            for h in handles:
                h.remove()

            for name in subset:
                gptq[name].fasterquant(
                    percdamp=percdamp, groupsize=groupsize, actorder=act_order, static_groups=static_groups
                )
                quantizers["model.layers.%d.%s" % (i, name)] = gptq[name].quantizer
                gptq[name].free()

        for j in range(nsamples):
            outs[j] = _first(layer(inps[j].unsqueeze(0), **layer_kwargs))[0]

        layers[i] = layer.to(home)
        del layer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        inps, outs = outs, inps

    model.config.use_cache = use_cache
    return quantizers


@torch.no_grad()
def llama_eval(model, testenc, dev, seqlen, limit=None):
    testenc = testenc.input_ids
    nsamples = testenc.numel() // seqlen
    if limit is not None:
        nsamples = min(nsamples, limit)
    home = next(model.parameters()).device

    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.layers

    model.model.embed_tokens = model.model.embed_tokens.to(dev)
    model.model.rotary_emb = model.model.rotary_emb.to(dev)
    layers[0] = layers[0].to(dev)
    batches = [testenc[:, (i * seqlen) : ((i + 1) * seqlen)] for i in range(nsamples)]
    inps, layer_kwargs = _catch_inputs(model, batches, dev, nsamples, seqlen)
    layers[0] = layers[0].to(home)
    model.model.embed_tokens = model.model.embed_tokens.to(home)

    outs = torch.zeros_like(inps)
    for i in range(len(layers)):
        layer = layers[i].to(dev)
        for j in range(nsamples):
            outs[j] = _first(layer(inps[j].unsqueeze(0), **layer_kwargs))[0]
        layers[i] = layer.to(home)
        del layer
        inps, outs = outs, inps

    if model.model.norm is not None:
        model.model.norm = model.model.norm.to(dev)
    model.lm_head = model.lm_head.to(dev)

    testenc = testenc.to(dev)
    nlls = []
    for i in range(nsamples):
        hidden_states = inps[i].unsqueeze(0)
        if model.model.norm is not None:
            hidden_states = model.model.norm(hidden_states)
        lm_logits = model.lm_head(hidden_states)
        shift_logits = lm_logits[:, :-1, :].contiguous()
        shift_labels = testenc[:, (i * seqlen) : ((i + 1) * seqlen)][:, 1:]
        loss_fct = nn.CrossEntropyLoss()
        loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        neg_log_likelihood = loss.float() * seqlen
        nlls.append(neg_log_likelihood)
    ppl = torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen))
    model.model.norm = model.model.norm.to(home)
    model.lm_head = model.lm_head.to(home)
    model.config.use_cache = use_cache
    return float(ppl)


# -- the comparison ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    text: str
    bits: int
    group: int | None  # None: one group per row (per channel)
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = False
    seed: int | None = None  # the calibration draw (default --seed)

    @classmethod
    def parse(cls, text: str) -> Setting:
        parts = text.strip().split(":")
        if len(parts) < 2 or not parts[0].startswith("int") or not (parts[1] == "pc" or parts[1].startswith("g")):
            raise SystemExit(f"setting {text!r}: expected int{{BITS}}:{{pc|gN}}[:act|:static|:ts|:sSEED]")
        seeds = [int(f[1:]) for f in parts[2:] if f[:1] == "s" and f[1:].isdigit()]
        flags = {f for f in parts[2:] if not (f[:1] == "s" and f[1:].isdigit())}
        unknown = flags - {"act", "static", "ts"}
        if unknown:
            raise SystemExit(f"setting {text!r}: unknown flags {sorted(unknown)} (act, static, ts, sSEED)")
        group = None if parts[1] == "pc" else int(parts[1][1:])
        act = "act" in flags
        return cls(text, int(parts[0][3:]), group, act, group is not None and (act or "static" in flags), "ts" in flags,
                   seeds[-1] if seeds else None)

    @property
    def mixq_format(self) -> str:
        return f"int{self.bits}" + (f"-g{self.group}" if self.group else "")

    def mixq_plan(self) -> Plan:
        opts = {}
        if self.act_order:
            opts["act_order"] = True
        if self.static_groups:
            opts["static_groups"] = True
        return Plan.uniform(self.mixq_format, "gptq", **opts)


def block_linears(model) -> dict[str, nn.Linear]:
    return {f"model.layers.{i}.{n}": m for i, layer in enumerate(model.model.layers) for n, m in find_layers(layer).items()}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().to("cpu", copy=True) for n, m in block_linears(model).items()}


def restore(model, weights: dict[str, torch.Tensor]) -> None:
    for n, m in block_linears(model).items():
        m.weight.data = weights[n].to(m.weight.device, copy=True)


def compare(ref: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], nblocks: int) -> dict:
    """Where two quantized models differ: per layer of block 0, and per block.

    ``frac_flips`` counts entries that differ by more than 0.2% of their magnitude: a
    different code or grid, not a scale rounded to float16 (at most 0.05%).
    """
    def stats(names):
        a = torch.cat([ref[n].float().flatten() for n in names])
        b = torch.cat([ours[n].float().flatten() for n in names])
        d = (a - b).abs()
        flips = d > 2e-3 * torch.maximum(a.abs(), b.abs())
        return {"max_abs_diff": float(d.max()), "frac_differ": float((d > 0).float().mean()),
                "frac_flips": float(flips.float().mean()), "rel_fro": float(d.norm() / a.norm().clamp_min(1e-30))}

    first = {n.split(".", 3)[3]: stats([n]) for n in ref if n.startswith("model.layers.0.")}
    blocks = [stats([n for n in ref if n.startswith(f"model.layers.{b}.")]) for b in range(nblocks)]
    differ = [b for b, s in enumerate(blocks) if s["frac_flips"] > 0]
    return {"block0": first, "blocks": blocks, "first_block_with_flips": differ[0] if differ else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--settings", default="int4:pc,int4:g128,int3:g128,int4:g128:act")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0, help="calibration draw")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N test windows (default all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch-size", type=int, default=8, help="mixq's calibration and evaluation batch")
    ap.add_argument("--reference-eval", action="store_true", help="also score with the reference's llama_eval")
    ap.add_argument("--ref-variants", default="fp32",
                    help="reference runs per setting, the first one compared: fp32 (as published), fp16 (scales "
                         "rounded as mixq stores them), fp32-rev / fp16-rev (calibration windows in reverse order)")
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args()
    settings = [Setting.parse(s) for s in args.settings.split(",") if s.strip()]
    dev = torch.device(args.device)
    variants = [v.strip() for v in args.ref_variants.split(",") if v.strip()]
    if not variants or set(variants) - {"fp32", "fp16", "fp32-rev", "fp16-rev"}:
        raise SystemExit(f"--ref-variants {args.ref_variants!r}: choose from fp32, fp16, fp32-rev, fp16-rev")
    torch.backends.cuda.matmul.allow_tf32 = False  # as gptq.py (PyTorch's default too)
    torch.backends.cudnn.allow_tf32 = False

    loaded = load_model(args.model, dtype=args.dtype, device=str(dev))
    model, tok = loaded.model, loaded.tokenizer
    nblocks = len(model.model.layers)

    dataloader, testenc = get_wikitext2(args.nsamples, args.seed, args.seqlen, tok, args.data_dir)
    val_ids = tokenize(tok, load_text("wikitext2", "validation", root=args.data_dir))
    calib = calibration_windows(val_ids, args.nsamples, args.seqlen, seed=args.seed)
    test = windows(tokenize(tok, load_text("wikitext2", "test", root=args.data_dir)), args.seqlen, limit=args.eval_limit)
    checks = {
        "calibration_windows_equal": torch.equal(torch.cat([b[0] for b in dataloader]), calib),
        "test_tokens_equal": torch.equal(testenc.input_ids[0], tokenize(tok, load_text("wikitext2", "test", root=args.data_dir))),
    }
    if not checks["calibration_windows_equal"]:
        raise SystemExit("mixq.data.calibration_windows does not reproduce datautils.get_wikitext2's draw")
    dataloader = [(w.unsqueeze(0), None) for w in calib]  # one tensor for both pipelines
    print(f"checks {checks}", flush=True)

    base = snapshot(model)
    base_ppl = perplexity(model, test, batch_size=args.batch_size).ppl
    meta = {"model": args.model, "dtype": args.dtype, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "seed": args.seed, "eval_windows": len(test), "base_ppl": base_ppl, "checks": checks,
            "ref_variants": variants, "batch_size": args.batch_size}

    def eval_ref():
        return llama_eval(model, testenc, dev, args.seqlen, args.eval_limit) if args.reference_eval else None

    meta["base_ppl_reference_eval"] = eval_ref()
    print(f"base ppl {base_ppl:.4f}", flush=True)

    draws = {args.seed: (dataloader, calib)}
    rows = []
    for s in settings:
        seed = args.seed if s.seed is None else s.seed
        if seed not in draws:  # the same draw for both pipelines, as above
            c = calibration_windows(val_ids, args.nsamples, args.seqlen, seed=seed)
            draws[seed] = ([(w.unsqueeze(0), None) for w in c], c)
        dataloader, calib = draws[seed]
        refs = {}
        for variant in variants:
            loader = dataloader[::-1] if variant.endswith("-rev") else dataloader
            _sync(dev)
            t = time.perf_counter()
            llama_sequential(model, loader, dev, wbits=s.bits, groupsize=s.group or -1, act_order=s.act_order,
                             static_groups=s.static_groups, true_sequential=s.true_sequential,
                             fp16_scale=variant.startswith("fp16"))
            _sync(dev)
            seconds = time.perf_counter() - t
            refs[variant] = {"ppl": perplexity(model, test, batch_size=args.batch_size).ppl, "seconds": seconds,
                             "ppl_reference_eval": eval_ref(), "weights": snapshot(model)}
            restore(model, base)

        _sync(dev)
        t = time.perf_counter()
        quantize_(model, s.mixq_plan(), calibration=calib, device=dev, batch_size=args.batch_size,
                  true_sequential=s.true_sequential)
        _sync(dev)
        ours_seconds = time.perf_counter() - t
        ours_ppl = perplexity(model, test, batch_size=args.batch_size).ppl
        ours_eval = eval_ref()
        ours_weights = snapshot(model)
        restore(model, base)

        main_ref = refs[variants[0]]
        row = {"setting": s.text, "seed": seed, "format": s.mixq_format, "act_order": s.act_order, "static_groups": s.static_groups,
               "true_sequential": s.true_sequential, "ref_variant": variants[0], "ref_ppl": main_ref["ppl"],
               "ours_ppl": ours_ppl, "rel_gap": ours_ppl / main_ref["ppl"] - 1, "ref_seconds": main_ref["seconds"],
               "ours_seconds": ours_seconds, "ref_ppl_reference_eval": main_ref["ppl_reference_eval"],
               "ours_ppl_reference_eval": ours_eval, "ref_vs_ours": compare(main_ref["weights"], ours_weights, nblocks),
               "variants": {}}
        for variant, r in list(refs.items())[1:]:
            row["variants"][variant] = {
                "ppl": r["ppl"], "seconds": r["seconds"], "ppl_reference_eval": r["ppl_reference_eval"],
                "rel_gap_ours": ours_ppl / r["ppl"] - 1, "rel_gap_ref": r["ppl"] / main_ref["ppl"] - 1,
                "vs_ours": compare(r["weights"], ours_weights, nblocks),
                "vs_ref": compare(main_ref["weights"], r["weights"], nblocks)}
        rows.append(row)
        extra = "".join(f"ref {v} {r['ppl']:9.3f}  " for v, r in row["variants"].items())
        print(f"{s.text:>16}: ref {main_ref['ppl']:9.3f} ({main_ref['seconds']:6.1f} s)  {extra}"
              f"ours {ours_ppl:9.3f} ({ours_seconds:6.1f} s)  gap {row['rel_gap']:+.2%}", flush=True)
        diffs = {variants[0]: row["ref_vs_ours"], **{v: r["vs_ours"] for v, r in row["variants"].items()}}
        for variant, diff in diffs.items():
            b0 = ", ".join(f"{n.split('.')[-1]} {v['max_abs_diff']:.1e}/{v['frac_flips']:.2%}"
                           for n, v in diff["block0"].items())
            print(f"{'':>16}  ours vs ref {variant}, block 0 max|diff|/codes differing: {b0}; "
                  f"first block with differing codes {diff['first_block_with_flips']}", flush=True)
        if args.out:
            write(args.out, meta, rows, loaded, dev)


def write(out: str, meta: dict, rows: list, loaded, dev) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "provenance": provenance(model=loaded.identity(), seed=meta["seed"], device=dev), "rows": rows}
    path.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
