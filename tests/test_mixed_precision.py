"""Mixed precision: `target_bits` (schemes chosen from measured sensitivity under a bit budget) and `layer_schemes`
(layers pinned to a scheme): the budget as the saved tensors count it, where the bits go, pins, the saved map,
save / reload, the model card and the refusals."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from conftest import FAMILIES, VOCAB, input_ids, model_output
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_ptq
from hf_ptq import PtqConfig
from hf_ptq.core.bit_budget import BudgetError, assign, candidate_schemes, stored_bits
from hf_ptq.core.layer_schemes import compact_schemes, entry_for
from hf_ptq.core.scheme import WeightScheme
from hf_ptq.formats.model_card import build_model_card
from hf_ptq.nn import QuantLinear

CALIBRATION = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))


def _mixed(method: str = "gptq", **kw) -> PtqConfig:
    return PtqConfig(method=method, bits=4, group_size=32, dataset=CALIBRATION, num_samples=8, seq_len=32, **kw)


def _layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "act_order"),
    [(2, 32, False, False), (3, 64, True, False), (4, -1, False, False), (8, 32, True, True), (3, 32, False, True)],
)
def test_stored_bits_are_the_bits_of_the_modules_tensors(bits, group_size, sym, act_order) -> None:
    for in_f, out_f in ((64, 96), (128, 40), (192, 33)):
        layer = QuantLinear(in_f, out_f, True, bits, group_size, sym, act_order=act_order, device="meta")
        scheme = WeightScheme(bits=bits, group_size=group_size, sym=sym)
        assert stored_bits(in_f, out_f, scheme, act_order=act_order) == layer.stored_bits(), (in_f, out_f)


def test_the_budget_holds_as_the_saved_tensors_count_it(tmp_path) -> None:
    model = hf_ptq.quantize(FAMILIES["llama"].build(), _mixed(target_bits=4.5))
    model.save_pretrained(tmp_path)
    layers = _layers(model)
    saved = 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            module, _, tensor = key.rpartition(".")
            if module in layers and tensor != "bias":
                t = f.get_tensor(key)
                saved += t.numel() * t.element_size() * 8
    weights = sum(m.in_features * m.out_features for m in layers.values())
    assert saved <= 4.5 * weights
    assert saved > 4.0 * weights  # the budget is spent, not left over
    assert len({(m.bits, m.group_size) for m in layers.values()}) > 1


def test_the_layer_with_a_dominant_hessian_gets_the_most_bits() -> None:
    """Four layers alike but for their inputs; one's 30x larger (a 900x larger input Hessian): the budget goes
    there first."""
    from hf_ptq.methods.rtn import rtn
    from hf_ptq.pipeline.sensitivity import LayerChoice, candidate_errors, choose_schemes, scheme_cost

    torch.manual_seed(0)
    cfg = PtqConfig(method="rtn", bits=4, group_size=32, target_bits=3.5)
    layers = []
    for i in range(4):
        weight, x, g = torch.randn(64, 128), torch.randn(256, 128) * (30 if i == 2 else 1), torch.randn(256, 64)
        schemes = candidate_schemes(128, cfg.scheme)
        errors = candidate_errors(weight, x, g, schemes, lambda w, sc: rtn(w, sc))
        costs = [scheme_cost(cfg, 128, 64, sc, 16) for sc in schemes]
        layers.append(LayerChoice(f"layer{i}", 64 * 128, schemes, costs, errors, False))
    bits = [layer.scheme.bits for layer in choose_schemes(layers, 3.5)]
    assert bits[2] == max(bits) and bits[2] > max(bits[:2] + bits[3:]), bits
    assert sum(layer.costs[layer.chosen] for layer in layers) <= 3.5 * 4 * 64 * 128


def test_candidate_errors_are_the_squared_first_order_loss_changes() -> None:
    from hf_ptq.methods.rtn import rtn
    from hf_ptq.pipeline.sensitivity import candidate_errors

    torch.manual_seed(1)
    weight, x, g = torch.randn(48, 64), torch.randn(20, 64), torch.randn(20, 48)
    scheme = WeightScheme(bits=3, group_size=32)
    delta = weight - rtn(weight, scheme).dequantize(torch.float32)
    expected = sum(float(g[t] @ (delta @ x[t])) ** 2 for t in range(20))
    (got,) = candidate_errors(weight, x, g, [scheme], lambda w, sc: rtn(w, sc))
    assert abs(got - expected) <= 1e-4 * expected


def test_output_gradients_are_those_of_the_loss_of_labels_sampled_from_the_model() -> None:
    """Against autograd on the layer's own output, with the same sampled labels (seeded per batch)."""
    from hf_ptq.pipeline.sensitivity import output_gradients

    model = FAMILIES["llama"].build(dtype=torch.float32).eval()
    name = "model.layers.1.mlp.down_proj"
    batches = [CALIBRATION[:2, :16], CALIBRATION[2:4, :16]]
    got_x, got_g = output_gradients(model, [name, "model.layers.0.self_attn.q_proj"], batches, tokens=16)[name]
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was computed or kept
    # the blocks recomputed their activations in the backward pass (checkpointed) and have their own forward again
    assert all("forward" not in vars(block) for block in model.model.layers)
    kept = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: kept.update(x=a[0], y=out))
    xs, gs = [], []
    for b, ids in enumerate(batches):
        logits = model(input_ids=ids).logits.reshape(-1, VOCAB)
        kept["y"].retain_grad()
        gen = torch.Generator().manual_seed(b)
        labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen)[:, 0]
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        rows = torch.arange((-32 * b) % 4, 32, 4)  # every 4th of the 64 tokens, counted across batches
        xs.append(kept["x"].reshape(-1, kept["x"].shape[-1])[rows].detach())
        gs.append(kept["y"].grad.reshape(-1, kept["y"].shape[-1])[rows])
    handle.remove()
    expected_g, expected_x = torch.cat(gs), torch.cat(xs)  # both kept in bf16
    assert got_g.shape == (16, 64) and torch.allclose(
        got_g.float(), expected_g, rtol=1e-2, atol=1e-3 * expected_g.abs().max()
    )
    assert torch.allclose(got_x.float(), expected_x, rtol=1e-2, atol=1e-3)


def test_a_mixed_model_reports_each_layers_error_share() -> None:
    quantized = hf_ptq.quantize(FAMILIES["llama"].build(), _mixed(method="rtn", target_bits=3.5))
    report = quantized.config.quantization_config._mixed_report
    assert [row[0] for row in report] == list(_layers(quantized))
    assert abs(sum(row[3] for row in report) - 1) < 1e-6


def test_pinned_layers_stay_as_pinned_with_and_without_a_budget() -> None:
    pins = {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": -1}, "k_proj": {"bits": 2}}
    for cfg in (_mixed(target_bits=3.5, layer_schemes=pins), PtqConfig(bits=4, group_size=32, layer_schemes=pins)):
        layers = _layers(hf_ptq.quantize(FAMILIES["llama"].build(), cfg))
        assert (layers["model.layers.0.mlp.down_proj"].bits, layers["model.layers.0.mlp.down_proj"].group_size) == (
            8,
            -1,
        )
        assert layers["model.layers.1.self_attn.k_proj"].bits == 2 == layers["model.layers.0.self_attn.k_proj"].bits
        assert layers["model.layers.1.self_attn.k_proj"].group_size == 32  # the config's group size
        if cfg.target_bits is None:
            assert layers["model.layers.1.mlp.down_proj"].bits == 4


def test_layers_sharing_an_input_get_schemes_of_their_own_in_gptq() -> None:
    """q / k / v share GPTQ's Hessian and are quantized per scheme: the same as each alone against that Hessian."""
    pins = {"q_proj": {"bits": 8}, "v_proj": {"bits": 2, "group_size": 64}}
    mixed = _layers(hf_ptq.quantize(FAMILIES["llama"].build(), _mixed(layer_schemes=pins)))
    alone = _layers(hf_ptq.quantize(FAMILIES["llama"].build(), _mixed(layer_schemes={"q_proj": {"bits": 8}})))
    assert (mixed["model.layers.0.self_attn.v_proj"].bits, mixed["model.layers.0.self_attn.v_proj"].group_size) == (
        2,
        64,
    )
    q = "model.layers.0.self_attn.q_proj"  # block 0's q_proj sees the same inputs in both runs
    assert mixed[q].bits == 8 and torch.equal(mixed[q].weight_packed, alone[q].weight_packed)


@pytest.mark.parametrize("method", ["gptq", "rtn", "awq"])
def test_a_mixed_model_saves_and_reloads_bit_identically(method, tmp_path) -> None:
    model = hf_ptq.quantize(FAMILIES["llama"].build(), _mixed(method=method, target_bits=4.25))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    block = saved["quantization_config"]
    block = block.get("hf_ptq", block)  # inside a portable compressed-tensors block, or hf_ptq's own
    assert block["target_bits"] == 4.25 and block["chosen_schemes"] and len(block["chosen_schemes"]) < 14
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(model_output(model, input_ids()), model_output(reloaded, input_ids()))
    card = build_model_card(model, "me/mixed").text
    assert "## Mixed precision" in card and "model.layers.1.mlp.down_proj" in card and "bits per weight" in card


def test_the_compact_map_selects_exactly_the_names_it_was_made_from() -> None:
    rng = random.Random(0)
    names = [f"model.layers.{i}.{p}" for i in range(12) for p in ("self_attn.q_proj", "mlp.down_proj", "mlp.up_proj")]
    entries = [{"bits": 2, "group_size": 32}, {"bits": 4, "group_size": 64}, {"bits": 8, "group_size": -1}]
    assignment = {n: rng.choice(entries) for n in names}
    compact = compact_schemes(assignment)
    assert len(compact) <= 9  # one pattern per (role, scheme)
    for name, entry in assignment.items():
        assert entry_for(compact, name)[1] == entry, name
    assert entry_for(compact, "model.layers.12.mlp.up_proj") is None


def _brute_force(costs, errors, budget):
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[p] for c, p in zip(costs, picks, strict=True))
        if cost <= budget:
            err = sum(e[p] for e, p in zip(errors, picks, strict=True))
            best = err if best is None or err < best else best
    return best


def test_the_assignment_fits_and_beats_every_single_multiplier_choice() -> None:
    """The Lagrangian guarantee: no choice of one λ (each layer alone minimising error + λ·bits) that fits does
    better; and within the largest error step of the exact optimum (brute force)."""
    rng = random.Random(1)
    for _ in range(40):
        layers = rng.randint(2, 5)
        costs = [sorted(rng.sample(range(10, 90), 4)) for _ in range(layers)]
        errors = [sorted((rng.uniform(0.1, 50) for _ in range(4)), reverse=True) for _ in range(layers)]
        budget = rng.uniform(sum(c[0] for c in costs), sum(c[-1] for c in costs))
        picks = assign(costs, errors, budget)
        cost = sum(c[p] for c, p in zip(costs, picks, strict=True))
        err = sum(e[p] for e, p in zip(errors, picks, strict=True))
        assert cost <= budget
        for lam in [x / 20 for x in range(0, 400)]:
            lagrange = [
                min(range(4), key=lambda i, c=c, e=e: e[i] + lam * c[i]) for c, e in zip(costs, errors, strict=True)
            ]
            if sum(c[p] for c, p in zip(costs, lagrange, strict=True)) <= budget:
                assert err <= sum(e[p] for e, p in zip(errors, lagrange, strict=True)) + 1e-9
        optimum = _brute_force(costs, errors, budget)
        assert optimum <= err <= optimum + max(e[0] - e[-1] for e in errors)
    with pytest.raises(BudgetError):
        assign([[10, 20]], [[1.0, 0.5]], 9)


def test_a_budget_below_the_cheapest_schemes_is_refused_before_any_weight_is_read(tiny_llama_dir) -> None:
    with pytest.raises(ValueError, match=r"PtqConfig\.target_bits=1\.5 is below .* at least 2\.") as info:
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_mixed(target_bits=1.5))
    assert "Raise target_bits" in str(info.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"down_proj": {"bits": 7}},
            r"layer_schemes\['down_proj'\]: bits=7 is invalid: bits must be one of 2, 3, 4, 5, 6, 8",
        ),
        ({"down_proj": {"sign": True}}, r"with keys among \('bits', 'group_size', 'sym', 'full_range'\)"),
        ({"down_proj": {"full_range": True}}, r"layer_schemes\['down_proj'\]: full_range=True needs sym=True"),
        ({"(down": {"bits": 8}}, r"not a valid regex"),
        (["down_proj"], r"PtqConfig\.layer_schemes=\['down_proj'\] is invalid"),
    ],
)
def test_invalid_layer_schemes_are_refused_naming_the_field(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        PtqConfig(method="rtn", layer_schemes=value)


def test_target_bits_is_refused_by_methods_without_per_layer_schemes() -> None:
    with pytest.raises(ValueError, match=r"PtqConfig\.target_bits=4\.5 does not apply to method='int8'"):
        PtqConfig(method="int8", target_bits=4.5)
    with pytest.raises(ValueError, match=r"PtqConfig\.target_bits=0\.5 is invalid"):
        PtqConfig(method="gptq", target_bits=0.5)


def test_a_pinned_group_size_that_does_not_divide_is_refused_before_loading(tiny_llama_dir) -> None:
    cfg = _mixed(target_bits=4.0, layer_schemes={"down_proj": {"group_size": 96}})
    with pytest.raises(ValueError, match=r"group_size=96 does not divide in_features=128 .*layer_schemes"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)


def test_the_gradient_pass_checkpoints_every_block(monkeypatch) -> None:
    """Each block runs under torch's checkpointing (activations recomputed in the backward pass, not kept)."""
    import torch.utils.checkpoint

    from hf_ptq.pipeline.sensitivity import output_gradients

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    model = FAMILIES["llama"].build(dtype=torch.float32).eval()
    output_gradients(model, ["model.layers.0.mlp.up_proj"], [CALIBRATION[:1, :16]], tokens=8)
    assert calls == [False] * len(model.model.layers)


def test_layer_entries_set_symmetry_and_range_per_layer_within_what_the_method_takes() -> None:
    """An entry's sym / full_range override the config's for that layer only (asymmetric entries drop the config's
    full range); a method refuses entries it cannot quantize, naming the entry."""
    pins = {"q_proj": {"bits": 5, "sym": True, "full_range": True}, "down_proj": {"sym": False}}
    cfg = PtqConfig(method="gptq", bits=4, group_size=32, sym=True, full_range=True, layer_schemes=pins)
    q, down, up = (cfg.scheme_for(f"model.layers.0.{n}") for n in ("self_attn.q_proj", "mlp.down_proj", "mlp.up_proj"))
    assert (q.bits, q.sym, q.full_range) == (5, True, True)
    assert (down.bits, down.sym, down.full_range) == (4, False, False)
    assert (up.bits, up.sym, up.full_range) == (4, True, True)
    with pytest.raises(ValueError, match=r"layer_schemes\['q_proj'\]: bits=5 is invalid for method='hqq'"):
        PtqConfig(method="hqq", layer_schemes={"q_proj": {"bits": 5}})
    with pytest.raises(ValueError, match=r"layer_schemes\['q_proj'\]: sym=True does not apply to method='hqq'"):
        PtqConfig(method="hqq", layer_schemes={"q_proj": {"sym": True}})
    with pytest.raises(ValueError, match=r"layer_schemes\['q_proj'\]: full_range=True does not apply to method='hqq'"):
        PtqConfig(method="hqq", layer_schemes={"q_proj": {"sym": True, "full_range": True}})
    with pytest.raises(ValueError, match=r"PtqConfig\.bits: bits=6 is invalid for method='hqq'"):
        PtqConfig(method="hqq", bits=6)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_walks_install_each_layer_with_its_own_symmetry(method, tiny_llama_dir, tmp_path) -> None:
    """Per-layer `sym` / `full_range` entries through the block-by-block walk: each layer holds its own grid
    (zero points only where asymmetric, the full range's -2^(b-1) level used), and the model reloads bit for bit."""
    pins = {"self_attn.q_proj": {"bits": 5, "sym": True, "full_range": True}, "mlp.down_proj": {"bits": 6}}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=_mixed(method, layer_schemes=pins))
    for name, layer in _layers(model).items():
        bits, sym = (5, True) if name.endswith("q_proj") else (6, False) if name.endswith("down_proj") else (4, False)
        assert (layer.bits, layer.sym, layer.weight_zero_point is None) == (bits, sym, sym), name
        if name.endswith("q_proj"):
            assert int(layer.quantized_weight().q.min()) == -16, name
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = input_ids()
    assert torch.equal(model_output(reloaded, ids), model_output(model, ids))
