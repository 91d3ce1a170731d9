"""The calibration pipeline: Gram accumulation, block capture and propagation, groups."""

from __future__ import annotations

import json

import pytest
import torch

from mixq.calibration import Gram
from mixq.calibration.sequential import _call_block, _grams, _input_groups, capture_inputs
from mixq.cli import main
from mixq.errors import PlanError
from mixq.formats import parse_format
from mixq.models import Matrix, matrix_by_name
from mixq.plan import LayerSpec, Plan
from mixq.quantize import quantize_
from mixq.solvers import get_solver
from mixq.solvers.rtn import layer_loss


@pytest.fixture
def calib():
    return torch.randint(0, 300, (6, 48), generator=torch.Generator().manual_seed(1))


def test_gram_running_mean():
    x = torch.randn(3, 50, 16)
    g = Gram(16)
    for batch in x:
        g.add(batch)
    flat = x.reshape(-1, 16)
    assert torch.allclose(g.matrix, flat.T @ flat / 150, atol=1e-5)
    assert g.tokens == 150


def _gemma3(**extra):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], **extra))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4))


FAMILIES = {"llama": lambda: __import__("conftest").tiny_llama(), "gemma3-mixed": _gemma3, "mistral-sliding": _mistral}


@pytest.mark.parametrize("family", FAMILIES)
def test_block_propagation_matches_the_model(family):
    """Every block fed its own captured arguments, in turn, reproduces the model's hidden
    states exactly (Gemma-3's sliding blocks see another mask than its full ones: the
    arguments of block 0 for all gave 2.85 after block 1)."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(1))
    captured = capture_inputs(model, ids, batch_size=4, device=torch.device("cpu"))
    blocks = model.model.layers
    assert [len(h) for h in captured.hidden] == [4, 2] and len(captured.kwargs) == len(blocks)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states  # embeddings, blocks 1..L-1, final norm
        hidden = captured.hidden
        assert torch.equal(torch.cat(hidden), reference[0])
        for b, block in enumerate(blocks):
            hidden = [_call_block(block, h, kw) for h, kw in zip(hidden, captured.kwargs[b])]
            out = torch.cat(hidden)
            assert torch.equal(out if b + 1 < len(blocks) else model.model.norm(out), reference[b + 1]), b


def test_blocks_share_the_model_argument_objects():
    """Gemma-3 gives its sliding and full blocks two masks and two rotary embeddings, each held once."""
    model = _gemma3().eval()
    captured = capture_inputs(model, torch.randint(0, 300, (2, 16)), batch_size=2, device=torch.device("cpu"))
    for key in ("attention_mask", "position_embeddings"):  # a full-attention mask may be None (causal SDPA)
        values = [kw[0][key] for kw in captured.kwargs]
        assert values[0] is values[2] and values[1] is values[3] and values[0] is not values[1], key


def test_input_groups_in_execution_order(model, calib):
    captured = capture_inputs(model, calib, batch_size=6, device=torch.device("cpu"))
    block = model.model.layers[0]
    targets = {n: Matrix(n, m) for n, m in block.named_modules() if n.endswith("proj")}
    assert _input_groups(targets, lambda: _call_block(block, captured.hidden[0], captured.kwargs[0][0])) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


class _Chain(torch.nn.Module):
    """Each Linear reads a fresh tensor made after the previous one's input was freed (its
    memory may be reused at the same address); the last reads a tensor changed in place."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x, **_):
        y = self.a(x * 2)
        y = self.b(x * 3) + y
        buf = x * 4
        y = self.c(buf) + y
        buf.mul_(2)
        return self.d(buf) + y


@pytest.mark.parametrize("rows,dim", [(4, 64), (64, 256), (512, 512)])
def test_input_groups_ignore_reused_addresses(rows, dim):
    block, x = _Chain(dim), torch.randn(rows, dim)
    targets = {k: Matrix(k, getattr(block, k)) for k in "abcd"}
    with torch.no_grad():
        for _ in range(3):
            assert _input_groups(targets, lambda: block(x)) == [["a"], ["b"], ["c"], ["d"]]


def test_gptq_pipeline_reduces_reconstruction_error(model, calib):
    result = quantize_(model, Plan.uniform("int3-g32", "gptq"), calibration=calib, batch_size=4)
    rows = result.report()
    assert len(rows) == 14 and all(r["rel_error"] is not None for r in rows)
    assert sum(r["rel_error"] for r in rows) < 0.8 * sum(r["rtn_rel_error"] for r in rows)
    fmt = parse_format("int3-g32")
    for name, layer in result.layers.items():
        assert torch.equal(fmt.dequantize(layer.qtensor).to(torch.float32), model.get_submodule(name).weight)


def _inputs_of(model, module, ids):
    """The rows a module reads when the model runs on ``ids`` (a plain hook, not mixq's)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    return x, x.T @ x / len(x)


def test_rtn_with_calibration_reports_its_error_on_the_layer_input(model, calib):
    q_proj = model.model.layers[0].self_attn.q_proj
    x, _ = _inputs_of(model, q_proj, calib)
    w = q_proj.weight.detach().clone()
    rows = quantize_(model, Plan.uniform("int4-g32"), calibration=calib, batch_size=4).report()
    row = next(r for r in rows if r["layer"] == "model.layers.0.self_attn.q_proj")
    w_hat = q_proj.weight.detach()
    ref = float(((x @ w.T - x @ w_hat.T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert row["rel_error"] == pytest.approx(ref, rel=1e-4) and row["rel_error"] == row["rtn_rel_error"]


def test_lm_head_solved_on_the_final_norm_of_the_quantized_model(calib):
    """A calibrated solver serves lm_head too (it was refused as "outside the transformer blocks")."""
    from conftest import tiny_llama

    model = tiny_llama(tie=False)
    w0 = model.lm_head.weight.detach().clone()
    plan = Plan(rules=(("lm_head", LayerSpec.of("int8", "gptq")),), default=LayerSpec.of("int4-g32", "gptq"))
    head = quantize_(model, plan, calibration=calib, batch_size=4).layers["lm_head"]
    with torch.no_grad():
        x = model.model(calib).last_hidden_state.reshape(-1, 64)  # the final norm, on the quantized blocks
    assert head.loss == pytest.approx(layer_loss(w0, model.lm_head.weight.detach(), x.T @ x / len(x)), rel=1e-4)
    assert head.rel_error < head.rtn_rel_error


def test_conv1d_solved_on_the_gram_of_its_input():
    from test_architectures import build

    model = build("gpt2")
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    c_attn = model.transformer.h[0].attn.c_attn
    _, gram = _inputs_of(model, c_attn, ids)
    w0 = c_attn.weight.detach().T.clone()  # [out, in]
    layer = quantize_(model, Plan.uniform("int3-g32", "gptq"), calibration=ids, batch_size=2).layers[
        "transformer.h.0.attn.c_attn"]
    assert layer.loss == pytest.approx(layer_loss(w0, c_attn.weight.detach().T, gram), rel=1e-4)
    assert layer.rel_error < layer.rtn_rel_error
    assert torch.equal(parse_format("int3-g32").dequantize(layer.qtensor), c_attn.weight.T)


def _linear_calls(monkeypatch, weights: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The inputs of every ``F.linear`` call on one of ``weights`` (matched by storage)."""
    calls: dict[str, list[torch.Tensor]] = {k: [] for k in weights}
    linear = torch.nn.functional.linear

    def spy(x, w, *rest):
        for k, ref in weights.items():
            if w.data_ptr() == ref.data_ptr() and w.shape == ref.shape:
                calls[k].append(x.detach().clone())
        return linear(x, w, *rest)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    return calls


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_expert_grams_are_those_of_the_routed_tokens(family, monkeypatch):
    """Per expert, the Gram of what the model's own (eager) experts loop feeds that expert,
    whichever experts implementation the calibration runs on."""
    from test_architectures import build

    model = build(family)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    experts = model.model.layers[0].mlp.experts
    weights = {f"{p}.{e}": getattr(experts, p)[e] for p in ("gate_up_proj", "down_proj") for e in range(4)}
    model.set_experts_implementation("eager")
    calls = _linear_calls(monkeypatch, weights)
    with torch.no_grad():
        model(ids)
    monkeypatch.undo()
    model.set_experts_implementation("batched_mm")
    captured = capture_inputs(model, ids, batch_size=2, device=torch.device("cpu"))
    block = model.model.layers[0]
    run = lambda i: _call_block(block, captured.hidden[i], captured.kwargs[0][i])  # noqa: E731
    for p in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{p}"
        grams = _grams({name: matrix_by_name(model, name)}, [name], run, 2, [None, None])
        for e, gram in enumerate(grams):
            x = torch.cat(calls[f"{p}.{e}"])
            assert gram.tokens == len(x) and torch.allclose(gram.matrix, x.T @ x / len(x), atol=1e-5), (p, e)


def test_an_expert_no_token_reaches_is_solved_on_the_identity(monkeypatch):
    from test_architectures import build

    model = build("mixtral")
    gate = model.model.layers[0].mlp.gate

    def route(h):  # Mixtral's router with expert 3 never chosen
        logits = torch.nn.functional.linear(h.reshape(-1, h.shape[-1]), gate.weight)
        logits[:, 3] = float("-inf")
        top, idx = logits.softmax(-1).topk(2, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    monkeypatch.setattr(gate, "forward", route)
    experts = model.model.layers[0].mlp.experts
    w0 = {p: getattr(experts, p)[3].detach().clone() for p in ("gate_up_proj", "down_proj")}
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    result = quantize_(model, Plan.uniform("int3-g32", "gptq"), calibration=ids, batch_size=2)
    gptq = get_solver("gptq")
    for p, w in w0.items():
        layer = result.layers[f"model.layers.0.mlp.experts.{p}.3"]
        expected = gptq(w, parse_format("int3-g32"), torch.eye(w.shape[1]), gptq.options({})).weight
        assert torch.equal(getattr(experts, p)[3], expected) and layer.loss == pytest.approx(float((w - expected).pow(2).sum()))
    assert result.layers["model.layers.0.mlp.experts.down_proj.2"].rel_error < \
        result.layers["model.layers.0.mlp.experts.down_proj.2"].rtn_rel_error  # a routed expert: its own Gram


def test_true_sequential_changes_later_grams(calib):
    from conftest import tiny_llama

    a, b = tiny_llama(), tiny_llama()
    ra = quantize_(a, Plan.uniform("int2-g32", "gptq"), calibration=calib, true_sequential=True).report()
    rb = quantize_(b, Plan.uniform("int2-g32", "gptq"), calibration=calib, true_sequential=False).report()
    q = [r["rel_error"] for r in ra if "q_proj" in r["layer"]][0], [r["rel_error"] for r in rb if "q_proj" in r["layer"]][0]
    o = [r["rel_error"] for r in ra if "layers.0.self_attn.o_proj" in r["layer"]][0], \
        [r["rel_error"] for r in rb if "layers.0.self_attn.o_proj" in r["layer"]][0]
    assert q[0] == pytest.approx(q[1], rel=1e-6)  # the first group sees the same inputs
    assert o[0] != pytest.approx(o[1], rel=1e-3)  # o_proj sees quantized q/k/v only when sequential


def test_calibrated_solver_without_data(model):
    with pytest.raises(PlanError, match="needs calibration data"):
        quantize_(model, Plan.uniform("int4-g32", "gptq"))


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_calibrated_eval_and_report(capsys, tiny_dir, text_file, tmp_path):
    report = tmp_path / "report.json"
    code, out, _ = _cli(capsys, "eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--plan", "int3-g32",
                        "--solver", "gptq", "--calib-dataset", str(text_file), "--nsamples", "4", "--seqlen", "32",
                        "--limit", "2", "--json", "--device", "cpu", "--report", str(report))
    assert code == 0
    row = json.loads(out)
    assert row["calibration"]["nsamples"] == 4 and row["plan"] == "int3-g32 gptq"
    layers = json.loads(report.read_text())["layers"]
    assert len(layers) == 14 and all(r["solver"] == "gptq" and r["rel_error"] < r["rtn_rel_error"] * 1.05 for r in layers)


def test_cli_outliers_size_and_errors(capsys, tiny_dir, text_file):
    base = ["eval", "--model", str(tiny_dir), "--dataset", str(text_file), "--plan", "int3-g32", "--calib-dataset",
            str(text_file), "--nsamples", "2", "--seqlen", "32", "--limit", "1", "--json", "--device", "cpu"]
    code, out, _ = _cli(capsys, *base, "--solver", "quantease", "--outliers", "0.01", "--option", "iterations=2")
    plain = json.loads(_cli(capsys, *base)[1])
    assert code == 0 and json.loads(out)["bits_per_weight"] > plain["bits_per_weight"]  # outliers are counted
    code, out_g, _ = _cli(capsys, *base, "--solver", "gptq", "--outliers", "0.01")
    assert code == 0 and json.loads(out_g)["bits_per_weight"] == json.loads(out)["bits_per_weight"]  # same storage
    code, out_r, _ = _cli(capsys, *base, "--solver", "rtn", "--outliers", "0.01")
    assert code == 0 and json.loads(out_r)["bits_per_weight"] == json.loads(out)["bits_per_weight"]
    code, _, err = _cli(capsys, *base, "--solver", "rtn", "--outliers", "1.5")
    assert code == 2 and "outliers must be a fraction in [0, 1)" in err
    code, _, err = _cli(capsys, *base, "--solver", "gptq", "--outliers", "0.01", "--option", "keep_columns=0.01")
    assert code == 2 and "outliers or keep_columns, not both" in err
    code, _, err = _cli(capsys, *base, "--structured")
    assert code == 2 and "--structured needs --outliers" in err
    code, _, err = _cli(capsys, *base, "--solver", "gptq", "--seqlen", "100000")
    assert code == 2 and "fewer than one window" in err


def test_blocks_moved_for_their_forward_keep_their_inputs_and_outputs():
    """Where the blocks live on another device than the calibration's, each is moved for its
    forward by hooks: the hooks must not replace the block's inputs or outputs."""
    from conftest import tiny_llama

    from mixq.calibration import sequential

    model = tiny_llama()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    want = model(ids).logits
    blocks = model.model.layers
    original = sequential._same_device
    try:
        sequential._same_device = lambda a, b: False  # as cuda:0 against cuda, or CPU blocks calibrated on a GPU
        with torch.no_grad(), sequential._blocks_on(blocks, torch.device("cpu")):
            got = model(ids).logits
    finally:
        sequential._same_device = original
    assert torch.equal(got, want)
