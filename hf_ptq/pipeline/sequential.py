"""The sequential calibration pipeline: quantize a model block by block with a calibrated method.

For each block, in order:
1. statistics: run the calibration batches through the block with forward pre-hooks on its Linears, feeding the
   method's statistics (one accumulator per *input*: Linears called on the same tensor, e.g. q/k/v, share it).
   With `true_sequential` this happens stage by stage (the Linears sharing an input, in call order: q/k/v, then
   o_proj, then gate/up, then down_proj), each stage seeing the already quantized stages before it. Every pass
   stops (sentinel exception) as soon as the stage's last input has been seen.
2. quantize: the method turns each input group's stacked float weights and statistics into `QuantizedWeight`s;
   `QuantLinear`s replace the Linears.
3. propagate: the batches go through the quantized block; its outputs are the next block's inputs, so later
   blocks see the quantization error of earlier ones.
Memory beyond the model: the hidden states of the calibration set in the model's dtype (replaced in place; a
block runs in fp32 on CPUs without native bf16, one batch at a time) and one batch's activations. The float
weights a block no longer needs give their memory-mapped checkpoint pages back, and freed heap goes back to the
OS after every block, so the peak stays near one block's working set above the quantized model. Linears outside
the blocks (e.g. BERT's pooler) get statistics from whole-model passes at the end. Encoder-decoder models are walked
stack by stack (`stacks.py`): the encoder's blocks, then the decoder's on the quantized encoder's output. Modules a
block keeps in another dtype than the model's (`_keep_in_fp32_modules`, e.g. T5's `wo` in fp16 models) get that dtype
back after the block.

Non-finite values stop the walk with an error naming where they are (`hf_ptq.core.finite`): a weight with NaN / inf
before its method runs, and hidden states with NaN / inf after the embeddings or after a block (naming that part's
non-finite parameters). A method's ValueError (e.g. GPTQ's singular Hessian) is raised again with the layers' names.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate.utils import has_offloaded_params
from torch import nn
from transformers.utils.logging import tqdm

from ..core.cpu import cpu_has_fast_bf16, cpu_threads
from ..core.finite import require_finite_activations, require_finite_weight
from ..core.page_release import checkpoint_files_mapped, release_file_pages, trim_heap
from ..core.warn_once import repeated_warnings_reported
from ..methods import MethodSpec, method_spec
from ..nn import QUANTIZED_MODULES
from ..nn.quant_linear import keep_dense_weights
from ..nn.replace import float_weight, linear_shape
from .capture import BlockCall, StopForward, no_cache_kwargs
from .families import family_layout
from .offload import install_quantized, read_float_weight
from .reuse import OutputStore, ReusableChild, is_reusable_output
from .smoothing import BlockSmoother
from .stacks import Stack, model_inputs, model_stacks

logger = logging.getLogger("hf_ptq")

Stage = list[list[str]]  # groups of Linear names (relative to their block) sharing one input, in call order

# A model whose largest quantized matmul on one calibration batch (rows x in x out) is below this runs the walk on
# one CPU thread (`small_work_threads`): its ops take microseconds, and on a loaded machine every multi-threaded op
# waits for a busy core (measured on a 2-block, 128-wide Llama with 8 x 64 tokens: 11 s per run with 2 threads
# against 0.3 s with 1, at a load average of 5.7 on 2 cores). GPTQ's factorization of H keeps the caller's count.
SMALL_WORK_MACS = 1 << 24


@dataclass(frozen=True)
class BlockLayout:
    """What one discovery pass learns about a block class: the Linears sharing an input, in call order (`groups`),
    those never called (`uncalled`), and the children whose outputs later passes can reuse."""

    groups: Stage
    uncalled: list[str]
    children: list[ReusableChild]


def discover_layout(block: nn.Module, names: list[str], hidden: torch.Tensor, call: BlockCall) -> BlockLayout:
    """Run `block` once on hidden with hooks on the Linears `names` and on the block's children holding them."""
    seen: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []  # inputs stay alive during the pass, so their ids are not reused
    called: list[str] = []  # Linear names, in call order
    child_calls: dict[str, list] = {}  # child name -> [(Linears called up to its end, output reusable)]

    def linear_hook(name: str):
        def fn(module, args):
            keep.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)
            called.append(name)

        return fn

    def child_hook(name: str):
        def fn(module, args, output):
            child_calls.setdefault(name, []).append((frozenset(called), is_reusable_output(output, hidden.numel())))

        return fn

    holders = {n.split(".", 1)[0] for n in names if "." in n}
    handles = [block.get_submodule(n).register_forward_pre_hook(linear_hook(n)) for n in names]
    handles += [block.get_submodule(c).register_forward_hook(child_hook(c)) for c in sorted(holders)]
    try:
        call.run(block, hidden)
    finally:
        for h in handles:
            h.remove()
    groups = list(seen.values())
    reached = set(called)
    children = [ReusableChild(c, calls[0][0]) for c, calls in child_calls.items() if len(calls) == 1 and calls[0][1]]
    return BlockLayout(groups, [n for n in names if n not in reached], children)


def collect(
    block: nn.Module,
    groups: Stage,
    statistics: Callable[[int], object],
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    work_dtype: torch.dtype,
    store: OutputStore,
) -> list[object]:
    """Statistics of each group's input over all batches (run in `work_dtype`); each pass stops after the last
    group's input. Run inside `store.replaying_finished_children`: finished children are reused."""
    stats = [statistics(linear_shape(block.get_submodule(g[0]))[0]) for g in groups]

    def hook(index: int):
        def fn(module, args):
            stats[index].add_batch(args[0])
            if index == len(groups) - 1:
                raise StopForward

        return fn

    handles = [block.get_submodule(g[0]).register_forward_pre_hook(hook(i)) for i, g in enumerate(groups)]
    try:
        for b, (h, call) in enumerate(zip(hidden, calls, strict=True)):
            store.batch = b
            try:
                call.run(block, h.to(work_dtype))
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _float_dtype(blocks: nn.ModuleList) -> torch.dtype:
    """The dtype of the blocks' float parameters (the model's dtype)."""
    for p in blocks.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def calibration_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """dtype the blocks run in during calibration: fp32 for half-precision models on CPUs without native bf16
    (where half matmuls are up to 10x slower than fp32) unless accelerate offloads weights; else the model's."""
    offloaded = any(has_offloaded_params(m) for m in model.modules())
    on_cpu = all(p.device.type in ("cpu", "meta") for p in model.parameters())
    if dtype in (torch.bfloat16, torch.float16) and on_cpu and not offloaded and not cpu_has_fast_bf16():
        return torch.float32
    return dtype


def to_work_dtype(
    block: nn.Module, work_dtype: torch.dtype, release_pages: bool = True, kept: dict[str, torch.dtype] | None = None
) -> None:
    """Cast `block` to `work_dtype` but for the tensors of `kept` (`kept_dtypes`: they stay in their own dtype); the
    float tensors it held before give back their checkpoint pages (the block now holds copies) unless
    `release_pages` is False (`checkpoint_files_mapped`)."""
    before = [t for t in block.state_dict().values() if t.is_floating_point() and t.dtype != work_dtype]
    cast_block(block, work_dtype, kept or {})
    if release_pages:
        release_file_pages(*before)


def kept_dtypes(block: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The float tensors (names relative to `block`) in another dtype than `dtype` (the model's), with theirs: what
    `_keep_in_fp32_modules` kept in fp32, e.g. T5's `wo` in a float16 model (it overflows in float16)."""
    tensors = [*block.named_parameters(), *block.named_buffers()]
    return {n: t.dtype for n, t in tensors if t.is_floating_point() and t.dtype != dtype}


def cast_block(block: nn.Module, dtype: torch.dtype, kept: dict[str, torch.dtype]) -> None:
    """Cast `block` to `dtype`, the tensors of `kept` to their own dtype (those of Linears quantized meanwhile are
    gone: their quantized modules keep the model's dtype)."""
    block.to(dtype)
    for name, own in kept.items():
        module_name, _, attr = name.rpartition(".")
        module = block.get_submodule(module_name) if module_name else block
        tensor = getattr(module, attr, None)
        if isinstance(tensor, torch.Tensor) and not isinstance(module, QUANTIZED_MODULES):
            tensor.data = tensor.data.to(own)


def quantize_group(
    scope: nn.Module,
    group: list[str],
    stats: object | None,
    spec: MethodSpec,
    config,
    dtype: torch.dtype,
    smoother: BlockSmoother | None = None,
    prefix: str = "",
    release_pages: bool = True,
) -> None:
    """Quantize the Linears of `group` (sharing `stats`) with `spec`, stacked row-wise per scheme; swap in
    QuantLinears.

    `dtype` is the model's dtype: the weights are quantized as stored in it and the scales are kept in it. Each Linear
    gets `config.scheme_for(prefix + name)` (mixed precision: layers sharing an input may differ); the Linears of one
    scheme are quantized as one stacked weight. With a `smoother` (methods with `smooth`), the group's input scale
    is searched (on the grid of its fewest bits) and folded first. `prefix` + a name is the Linear's name in the
    model, for errors: a non-finite weight is refused (`require_finite_weight`), and a method's ValueError is raised
    again naming the group's layers. The replaced float weights give back their checkpoint pages unless
    `release_pages` is False (`checkpoint_files_mapped`)."""
    modules = [scope.get_submodule(n) for n in group]
    weights = [read_float_weight(m).to(dtype) for m in modules]
    for name, weight in zip(group, weights, strict=True):
        require_finite_weight(weight, prefix + name)
    schemes = [config.scheme_for(prefix + n) for n in group]
    with naming_layers([prefix + n for n in group]):
        if stats is None and spec.needs_calibration:
            logger.warning("hf_ptq: %s saw no calibration input; quantized with RTN instead.", ", ".join(group))
        elif smoother is not None:
            stacked = torch.cat(weights, 0) if len(weights) > 1 else weights[0]
            s = smoother.smooth(group, stacked, stats, min(schemes, key=lambda sc: sc.bits))
            del stacked
            if s is not None:
                weights = [(w.float() * s.to(w.device)).to(dtype) for w in weights]
                stats.rescale(s)
        results: dict[int, object] = {}
        for scheme in dict.fromkeys(schemes):
            members = [i for i, sc in enumerate(schemes) if sc == scheme]
            stacked = torch.cat([weights[i] for i in members], 0) if len(members) > 1 else weights[members[0]]
            if stats is None:
                qw = spec.quantize_without_statistics(stacked, scheme, config.options)
            else:
                qw = spec.quantize_weight(stacked, scheme, config.options, stats)
            row = 0
            for i in members:
                results[i] = qw.rows(slice(row, row + weights[i].shape[0]))
                row += weights[i].shape[0]
            del stacked, qw
    for i, (name, module) in enumerate(zip(group, modules, strict=True)):
        install_quantized(scope, name, module, results[i], config, dtype)
    if release_pages:  # the replaced float weights are never read again
        release_file_pages(*(float_weight(m) for m in modules))


@contextmanager
def naming_layers(layers: list[str]) -> Iterator[None]:
    """Within: a ValueError (a method's, e.g. GPTQ's singular Hessian) is raised again with the layers' names in
    front, as the same type when that type takes a message (NonFiniteError, ValueError)."""
    try:
        yield
    except ValueError as err:
        where = ", ".join(layers)
        if where in str(err):
            raise
        message = f"{where}: {err}"
        try:
            again = type(err)(message)
        except TypeError:  # an error type with another signature (e.g. UnicodeDecodeError)
            again = ValueError(message)
        raise again from err


def check_block_output(hidden: list[torch.Tensor], block: nn.Module, name: str) -> None:
    """The calibration hidden states leaving block `name` must be finite (else the next block's statistics would
    be NaN): raise naming the block and its non-finite parameters."""
    suspects = ((f"{name}.{n}", t) for n, t in [*block.named_parameters(), *block.named_buffers()])
    require_finite_activations(hidden, f"block {name}", suspects)


def check_captured(hidden: list[torch.Tensor], model: nn.Module, prefix: str) -> None:
    """Block 0's captured inputs must be finite: raise naming the non-finite parameters outside the blocks
    (embeddings, position tables, ...)."""
    outside = ((n, t) for n, t in model.named_parameters() if not n.startswith(prefix + "."))
    require_finite_activations(hidden, f"the layers before {prefix}.0 (embeddings)", outside)


@torch.no_grad()
def quantize_blocks(
    model: nn.Module, config, batches: list[torch.Tensor], targets: list[str], desc: str | None = None
) -> list[str]:
    """Quantize the Linears `targets` (names, chosen and checked against the config by the quantizer before the
    weights loaded) block by block; returns the quantized names."""
    spec = method_spec(config.method)
    threads = small_work_threads(model, [model.get_submodule(n) for n in targets], batches)
    with cpu_threads(threads):
        return _quantize_blocks(model, config, batches, targets, spec, desc)


def small_work_threads(model: nn.Module, linears: list[nn.Module], batches: list[torch.Tensor]) -> int | None:
    """1 when the walk's work is too small for more CPU threads to help (`SMALL_WORK_MACS`), else None (unchanged).

    Results do not change: such a walk's ops (elementwise, reductions over tensors below torch's parallel grain,
    small matmuls) give the same bits on one thread; `test_small_models_calibrate_on_one_thread_with_the_same_result`
    compares the two walks, and the GPTQ, AWQ and SmoothQuant state dicts of tiny Llamas were compared with the
    walk before this rule (benchmarks/README.md, "fixed_costs.py")."""
    on_cpu = all(p.device.type in ("cpu", "meta") for p in model.parameters())
    if not on_cpu or not linears or not batches:
        return None
    rows = max(b.numel() for b in batches)
    largest = max(linear_shape(m)[0] * linear_shape(m)[1] for m in linears)
    return 1 if rows * largest < SMALL_WORK_MACS else None


@dataclass
class Walk:
    """What a walk over the blocks carries from block to block: where the blocks are, the dtypes, the calibration
    hidden states entering the next block ([batch, seq, dim] each, in the model's dtype) and the call arguments
    of each block, the layouts discovered so far, and the unscaled groups already reported."""

    model: nn.Module
    spec: MethodSpec
    config: object
    prefix: str
    blocks: nn.ModuleList
    dtype: torch.dtype
    work_dtype: torch.dtype
    release_pages: bool
    hidden: list[torch.Tensor]
    calls: list[list[BlockCall]]
    family: object
    layouts: dict[tuple, BlockLayout] = field(default_factory=dict)
    warned: set[tuple[str, ...]] = field(default_factory=set)

    @property
    def model_type(self) -> str | None:
        return getattr(getattr(self.model, "config", None), "model_type", None)


def start_walk(model: nn.Module, spec: MethodSpec, config, batches: list[torch.Tensor], stack: Stack) -> Walk:
    """Capture block 0's inputs of `stack` for every batch (checked finite) and fix the dtypes of the walk."""
    prefix, blocks = stack.prefix, stack.blocks
    dtype = _float_dtype(blocks)
    work_dtype = calibration_dtype(model, dtype)
    release = checkpoint_files_mapped()
    captured = stack.capture(batches)
    check_captured(captured.hidden, model, prefix)
    captured.calls_to_dtype(work_dtype)  # masks, rotary tables: small, cast once
    hidden = [h.to(dtype) for h in captured.hidden]
    captured.hidden = []  # replaced block by block in `walk.hidden`
    family = family_layout(getattr(getattr(model, "config", None), "model_type", None))
    return Walk(model, spec, config, prefix, blocks, dtype, work_dtype, release, hidden, captured.calls, family)


def _quantize_blocks(
    model: nn.Module, config, batches: list[torch.Tensor], targets: list[str], spec: MethodSpec, desc: str | None
) -> list[str]:
    done: list[str] = []
    stacks = model_stacks(model)
    with repeated_warnings_reported():  # a warning repeated per layer is said once, with its count at the end
        for stack in stacks:  # encoder-decoder models: the encoder's blocks, then the decoder's on its output
            walk = start_walk(model, spec, config, batches, stack)
            label = desc or f"hf_ptq {config.method}" + (f" ({stack.prefix})" if len(stacks) > 1 else "")
            done += walk_stack(walk, targets, label)
            dtype, release = walk.dtype, walk.release_pages
            del walk
    finished = set(done)
    leftovers = [n for n in targets if n not in finished]
    if leftovers:
        quantize_outside_blocks(model, leftovers, spec, config, batches, dtype, release)
        done += leftovers
    return done


def walk_stack(walk: Walk, targets: list[str], desc: str) -> list[str]:
    """Calibrate, quantize and propagate the blocks of `walk` in order; returns the names of `targets` quantized."""
    done: list[str] = []
    bar = tqdm(total=len(walk.blocks), desc=desc, unit="block")
    bar.set_postfix_str(f"{sum(h.shape[0] for h in walk.hidden)} samples")
    for i, block in enumerate(walk.blocks):
        head = f"{walk.prefix}.{i}."
        names = [n[len(head) :] for n in targets if n.startswith(head)]
        kept = kept_dtypes(block, walk.dtype)  # e.g. T5's fp32 `wo`: computes in fp32 during the walk too
        to_work_dtype(block, walk.work_dtype, walk.release_pages, kept)
        store = OutputStore(block, [], walk.dtype, walk.work_dtype)
        quantized = calibrate_and_quantize_block(walk, i, names, store) if names else set()
        done += [head + n for n in names]
        propagate(walk, i, store, quantized, kept)
        bar.update(1)
    bar.close()
    return done


def calibrate_and_quantize_block(walk: Walk, i: int, names: list[str], store: OutputStore) -> set[str]:
    """Block i, stage by stage (`true_sequential`) or all at once: the statistics of each group's input on the
    calibration batches, then the group quantized (after its scale is searched and folded, for methods that
    smooth). Returns the names (relative to the block) quantized."""
    block, calls, head = walk.blocks[i], walk.calls[i], f"{walk.prefix}.{i}."
    spec, config, first = walk.spec, walk.config, walk.hidden[0].to(walk.work_dtype)
    key = (type(block), tuple(names))
    if key not in walk.layouts:
        walk.layouts[key] = discover_layout(block, names, first, calls[0])
    layout = walk.layouts[key]
    store.children = layout.children
    smoother = None
    if spec.smooth is not None:
        smoother = BlockSmoother(block, walk.family, spec, config, functools.partial(calls[0].run, block, first))
    del first
    quantized: set[str] = set()
    for stage in [[g] for g in layout.groups] if config.true_sequential else [layout.groups]:
        with store.replaying_finished_children(quantized, record=True), keep_dense_weights(block):
            stats = collect(block, stage, spec.statistics, walk.hidden, calls, walk.work_dtype, store)
        for group, group_stats in zip(stage, stats, strict=True):
            quantize_group(block, group, group_stats, spec, config, walk.dtype, smoother, head, walk.release_pages)
            quantized.update(group)
    if smoother is not None:
        smoother.warn_unscaled(walk.warned, config.method, walk.model_type)
    for name in layout.uncalled:
        quantize_group(block, [name], None, spec, config, walk.dtype, prefix=head, release_pages=walk.release_pages)
        quantized.add(name)
    return quantized


def propagate(
    walk: Walk, i: int, store: OutputStore, quantized: set[str], kept: dict[str, torch.dtype] | None = None
) -> None:
    """Run the (quantized) block i on every batch: its outputs, checked finite, become the next block's inputs;
    then free what only block i needed, cast the block back (`kept`: its submodules in their own dtype,
    `kept_dtypes`) and give freed heap back."""
    block = walk.blocks[i]
    with store.replaying_finished_children(quantized, record=False), keep_dense_weights(block):
        for b, call in enumerate(walk.calls[i]):
            store.batch = b
            walk.hidden[b] = call.run(block, walk.hidden[b].to(walk.work_dtype)).to(walk.dtype)
    store.clear()
    check_block_output(walk.hidden, block, f"{walk.prefix}.{i}")
    walk.calls[i] = []  # this block's arguments are no longer needed
    cast_block(block, walk.dtype, kept or {})
    trim_heap()


@torch.no_grad()
def quantize_without_statistics(model: nn.Module, config, targets: list[str]) -> list[str]:
    """Quantize the Linears `targets` one by one with a method that reads no statistics (RTN, HQQ), each on its own
    scheme (`config.scheme_for`); returns their names."""
    spec = method_spec(config.method)
    dtype, release = _float_dtype(model), checkpoint_files_mapped()
    for name in tqdm(targets, desc=f"hf_ptq {config.method}", unit="layer"):
        quantize_group(model, [name], None, spec, config, dtype, release_pages=release)
    return list(targets)


def quantize_outside_blocks(
    model: nn.Module,
    names: list[str],
    spec: MethodSpec,
    config,
    batches: list[torch.Tensor],
    dtype: torch.dtype,
    release_pages: bool = True,
) -> None:
    """Linears outside the blocks (e.g. a pooler): statistics from whole-model passes, stopped once all are seen."""
    stats = {n: spec.statistics(linear_shape(model.get_submodule(n))[0]) for n in names}
    seen: set[str] = set()  # reached in the current forward
    reached: set[str] = set()  # reached in any forward

    def hook(name: str):
        def fn(module, args):
            stats[name].add_batch(args[0])
            seen.add(name)
            reached.add(name)
            if len(seen) == len(names):
                raise StopForward

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    extra = no_cache_kwargs(model)
    try:
        for ids in batches:
            seen.clear()
            try:
                model(**model_inputs(model, ids), **extra)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        stat = stats[name] if name in reached else None
        quantize_group(model, [name], stat, spec, config, dtype, release_pages=release_pages)
