"""Mixed precision from measured sensitivity: each Linear's cost to the model's output under every candidate scheme,
and the assignment that spends `target_bits` where it saves the most (`hf_ptq.core.bit_budget`).

The cost of a candidate is the second-order growth of the loss when the layer's weight W is replaced by its quantized
form (ΔW: W minus the dequantized rounding of the method without statistics: RTN for GPTQ / AWQ, HQQ's optimizer for
HQQ): `Σ_t (g_t · ΔW x_t)²` over calibration tokens t, with x_t the layer's input and g_t the gradient of the loss
with respect to its output, for the loss of a label *sampled from the model's own prediction* at each position. In
expectation over those labels, `(g · δ)²` is `δᵀ Jᵀ (diag(p) − p pᵀ) J δ`: the Gauss-Newton Hessian of the
cross-entropy at the output, i.e. twice the KL divergence the perturbation δ of that output causes (a Fisher that
the text's real labels, or a per-channel diagonal, estimate badly: docs/mixed_precision.md, "How the errors are
measured"). One forward and backward pass of the float model per calibration batch (`SENSITIVITY_TOKENS`) gives
x_t and g_t for evenly spaced tokens of each layer; the candidates are then scored from those alone.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from transformers.utils.logging import tqdm

from ..core.bit_budget import assign, candidate_schemes, check_budget, format_report, stored_bits
from ..core.layer_schemes import compact_schemes, entry_for, entry_of, scheme_over
from ..core.page_release import trim_heap
from ..core.scheme import WeightScheme
from ..methods import method_spec
from ..nn.replace import check_group_size, float_weight, linear_shape
from .capture import no_cache_kwargs
from .offload import read_float_weight
from .stacks import input_embeddings, model_inputs, model_stacks

logger = logging.getLogger("hf_ptq")

# Calibration tokens of the forward / backward passes (the first batches holding at least this many; all when there
# are fewer), run as sequences of at most `SENSITIVITY_SEQ` tokens (the backward's activations and logits scale
# with it). The tokens each layer is scored on (evenly spaced) are as many as `SCORED_BYTES` of kept inputs and
# gradients (bf16) and `SCORING_MACS` multiply-adds for all candidates of all layers allow, within
# [`MIN_SCORED`, `MAX_SCORED`].
SENSITIVITY_TOKENS = 1 << 12
SENSITIVITY_SEQ = 256
SCORED_BYTES = 1 << 27
SCORING_MACS = 1 << 38
MIN_SCORED, MAX_SCORED = 64, 512


@dataclass
class LayerChoice:
    """One Linear's candidates (`schemes`, their stored `costs` in bits and measured `errors`) and the chosen one."""

    name: str
    weights: int  # in_features * out_features
    schemes: list[WeightScheme]
    costs: list[int]
    errors: list[float]
    pinned: bool
    chosen: int = 0

    @property
    def scheme(self) -> WeightScheme:
        return self.schemes[self.chosen]


def layer_candidates(config, name: str, in_f: int, out_f: int, scale_bits: int) -> tuple[list[WeightScheme], bool]:
    """(the schemes layer `name` may get, pinned): its `layer_schemes` entry when pinned, else `candidate_schemes`."""
    pinned = entry_for(config.layer_schemes, name)
    schemes = [scheme_over(config.scheme, pinned[1])] if pinned else candidate_schemes(in_f, config.scheme)
    return schemes, pinned is not None


def scheme_cost(config, in_f: int, out_f: int, scheme: WeightScheme, scale_bits: int) -> int:
    """Stored bits of a layer of this shape under `scheme` with `config`'s method (act-order g_idx, float zeros)."""
    float_zero = method_spec(config.method).float_zero_point
    return stored_bits(
        in_f, out_f, scheme, act_order=config.act_order_for(scheme), scale_bits=scale_bits, float_zero_point=float_zero
    )


def check_search(model: nn.Module, config, targets: list[tuple[str, nn.Module]], scale_bits: int = 16) -> None:
    """Before any weight is read: the model has a language-model head (the errors are measured on its loss), pinned
    layers' group sizes divide their inputs, and `target_bits` holds the cheapest assignment (`BudgetError` naming
    the least budget that does)."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None:
        raise ValueError(
            f"PtqConfig.target_bits={config.target_bits!r} needs a model with a language-model head (e.g. "
            f"AutoModelForCausalLM): the layers' errors are measured on its loss, and {type(model).__name__} has "
            "none. Pin the layers' schemes with layer_schemes instead, or quantize uniformly (target_bits=None)."
        )
    pinned = [(n, m) for n, m in targets if entry_for(config.layer_schemes, n)]
    check_group_size(pinned, config.scheme_for)
    cheapest, weights = 0, 0
    for name, module in targets:
        in_f, out_f = linear_shape(module)
        schemes, _ = layer_candidates(config, name, in_f, out_f, scale_bits)
        cheapest += min(scheme_cost(config, in_f, out_f, s, scale_bits) for s in schemes)
        weights += in_f * out_f
    if weights:
        check_budget(config.target_bits, weights, cheapest)


def candidate_errors(
    weight: torch.Tensor, inputs: torch.Tensor, grads: torch.Tensor, schemes: list[WeightScheme], quantize: Callable
) -> list[float]:
    """`Σ_t (g_t · ΔW x_t)²` of weight [out, in] under each scheme (ΔW = W - dequantized `quantize(W, scheme)`), over
    the tokens of inputs [T, in] and output gradients grads [T, out]."""
    x, g = inputs.to(weight.device, torch.float32), grads.to(weight.device, torch.float32)
    errors = []
    for scheme in schemes:
        delta = weight.float() - quantize(weight, scheme).dequantize(torch.float32)
        errors.append(float(((x @ delta.t()) * g).sum(1).pow(2).sum()))
    return errors


def first_tokens(batches: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first batches holding at least `tokens` tokens (all of them when they hold fewer)."""
    taken, count = [], 0
    for batch in batches:
        if count >= tokens:
            break
        taken.append(batch)
        count += batch.numel()
    return taken


def scored_tokens(shapes: list[tuple[int, int]], candidates: int, total: int) -> int:
    """How many tokens each layer, of (in, out) `shapes`, is scored on: what `SCORED_BYTES` and `SCORING_MACS`
    allow, clamped."""
    per_token = sum(i + o for i, o in shapes) * 2  # bf16 input and gradient rows
    macs = sum(i * o for i, o in shapes) * candidates
    wanted = min(SCORED_BYTES // max(per_token, 1), SCORING_MACS // max(macs, 1))
    return int(min(total, max(MIN_SCORED, min(MAX_SCORED, wanted))))


def sequences(batches: list[torch.Tensor], length: int) -> list[torch.Tensor]:
    """The batches' token ids as [rows, <= length] pieces (each row cut into consecutive pieces)."""
    return [b[:, i : i + length] for b in batches for i in range(0, b.shape[1], length)]


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """Make each decoder block recompute its activations in the backward pass instead of keeping them (torch's
    non-reentrant checkpointing, eval mode: no dropout), so that the pass holds one block's activations, not all of
    them; returns the blocks (`del block.forward` undoes it; both stacks of encoder-decoder models). None for a
    model without a block list."""
    try:
        blocks = [block for stack in model_stacks(model) for block in stack.blocks]
    except ValueError:
        return []
    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    return list(blocks)


@torch.no_grad()
def output_gradients(
    model: nn.Module, targets: list[str], batches: list[torch.Tensor], tokens: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per Linear of `targets`: (inputs [T, in], loss gradients of its outputs [T, out]) at `tokens` evenly spaced
    calibration tokens, from a forward and backward pass of the float model per batch with labels sampled from its
    own predictions (a fixed seed per batch: the same tokens and labels every run)."""
    total = sum(b.numel() for b in batches)
    stride = max(1, total // tokens)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    picked: list[torch.Tensor] = []  # positions of the scored tokens in the current batch (flattened)

    recomputing = [False]  # during backward, checkpointed blocks run their forwards again: not a new token

    def hook(name: str):
        def fn(module, args, output):
            if recomputing[0]:
                return
            rows = picked[0]
            inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1])[rows].to(torch.bfloat16))

            def grad(g: torch.Tensor) -> None:
                grads[name].append(g.detach().reshape(-1, g.shape[-1])[rows].to(torch.bfloat16))

            output.register_hook(grad)

        return fn

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    checkpointed = checkpoint_blocks(model)
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in targets]
    handles += [e.register_forward_hook(lambda m, a, out: out.requires_grad_(True)) for e in input_embeddings(model)]
    extra = no_cache_kwargs(model)
    seen = 0
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            for b, ids in enumerate(tqdm(batches, desc="hf_ptq sensitivity (loss gradients)", unit="batch")):
                start = (-seen) % stride
                picked[:] = [torch.arange(start, ids.numel(), stride)]
                seen += ids.numel()
                logits = model(**model_inputs(model, ids), **extra).logits  # [b, seq, vocab]
                flat = logits.reshape(-1, logits.shape[-1]).float()
                labels = torch.multinomial(
                    flat.detach().softmax(-1), 1, generator=torch.Generator(flat.device).manual_seed(b)
                )[:, 0]
                loss = torch.nn.functional.cross_entropy(flat, labels, reduction="sum")
                del logits, flat, labels
                recomputing[0] = True
                loss.backward()
                recomputing[0] = False
                del loss
                trim_heap()  # the piece's activations and logits go back to the OS before the next piece
    finally:
        recomputing[0] = False
        for block in checkpointed:
            del block.forward  # the class's forward again
        for handle in handles:
            handle.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {n: (torch.cat(inputs[n]), torch.cat(grads[n])) for n in targets if inputs[n] and grads[n]}


@torch.no_grad()
def measure_layers(model: nn.Module, config, targets: list[str], batches: list[torch.Tensor]) -> list[LayerChoice]:
    """The candidates of every Linear in `targets`, with their stored costs and measured errors."""
    spec = method_spec(config.method)
    batches = sequences(first_tokens(batches, SENSITIVITY_TOKENS), SENSITIVITY_SEQ)
    dtype = float_weight(model.get_submodule(targets[0])).dtype
    scale_bits = torch.finfo(dtype).bits if dtype.is_floating_point else 16
    shapes = {n: linear_shape(model.get_submodule(n)) for n in targets}
    candidates = {n: layer_candidates(config, n, *shapes[n], scale_bits) for n in targets}
    most = max(len(c[0]) for c in candidates.values())
    tokens = scored_tokens(list(shapes.values()), most, sum(b.numel() for b in batches))
    measured = output_gradients(model, targets, batches, tokens)
    quantize = functools.partial(spec.quantize_without_statistics, options=config.options)
    layers = []
    for name in tqdm(targets, desc=f"hf_ptq sensitivity ({config.method} candidates)", unit="layer"):
        (in_f, out_f), (schemes, pinned) = shapes[name], candidates[name]
        costs = [scheme_cost(config, in_f, out_f, s, scale_bits) for s in schemes]
        if name in measured:
            weight = read_float_weight(model.get_submodule(name)).to(dtype)
            errors = candidate_errors(weight, *measured.pop(name), schemes, quantize)
        else:  # the loss does not depend on this layer (never called): its scheme costs nothing in error
            errors = [0.0] * len(schemes)
        layers.append(LayerChoice(name, in_f * out_f, schemes, costs, errors, pinned))
    del measured
    trim_heap()  # the kept inputs and gradients, before the method's own walk allocates
    return layers


def choose_schemes(layers: list[LayerChoice], target_bits: float) -> list[LayerChoice]:
    """Set each layer's `chosen` candidate: the least summed error with the summed cost within `target_bits` per
    weight."""
    budget = target_bits * sum(layer.weights for layer in layers)
    picks = assign([layer.costs for layer in layers], [layer.errors for layer in layers], budget)
    for layer, pick in zip(layers, picks, strict=True):
        layer.chosen = pick
    return layers


@torch.no_grad()
def search_layer_schemes(
    model: nn.Module, config, targets: list[str], batches: list[torch.Tensor]
) -> list[LayerChoice]:
    """Measure, choose, and record the choice in `config.chosen_schemes` (compact map; reloads read it) and
    `config._mixed_report` (not saved: the table of this run, for the CLI and the model card)."""
    layers = choose_schemes(measure_layers(model, config, targets, batches), config.target_bits)
    config.chosen_schemes = compact_schemes({layer.name: entry_of(layer.scheme, config.scheme) for layer in layers})
    config._mixed_report = report_rows(layers)
    spent = sum(layer.costs[layer.chosen] for layer in layers) / max(sum(layer.weights for layer in layers), 1)
    logger.info(
        "hf_ptq: chose %d layer schemes, %.3f bits per weight (target_bits=%g)", len(layers), spent, config.target_bits
    )
    logger.debug("hf_ptq: %s", format_report(config._mixed_report))
    return layers


def report_rows(layers: list[LayerChoice]) -> list[tuple[str, str, float, float]]:
    """(layer, scheme, bits per weight, share of the summed error) per layer, in model order."""
    total = sum(layer.errors[layer.chosen] for layer in layers) or 1.0
    return [
        (
            layer.name,
            layer.scheme.describe() + (" (pinned)" if layer.pinned else ""),
            layer.costs[layer.chosen] / layer.weights,
            layer.errors[layer.chosen] / total,
        )
        for layer in layers
    ]
