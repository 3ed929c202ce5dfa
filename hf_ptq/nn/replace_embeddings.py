"""Swap a model's input embedding and output head for quantized ones (`embeddings="int8" | "int4"`).

Three ways in, one layout: `replace_embeddings` builds empty modules on the meta device before weights load (a saved
checkpoint fills them, or quantize-on-load packs the float weight as it streams in: the module keeps a meta
placeholder `weight` for it); `quantize_embeddings` replaces float modules of a model in memory (after calibration,
or in `hf_ptq.quantize`). Both pack with `hf_ptq.core.embeddings.pack_rows`, so they give the same tensors.

Tied models (`tie_word_embeddings`, or one Parameter for both) get one `QuantEmbedding` and a `TiedQuantHead` that
multiplies by its tensors. transformers re-ties `lm_head.weight` to the embedding's weight after loading
(`tie_weights`, from `_tied_weights_keys` / `all_tied_weights_keys`): neither module has a `weight` Parameter any
more, so the pair is removed from those mappings (on every `PreTrainedModel` of the model, as instance attributes),
and the tie is the head's reference to the embedding. A reload learns whether the head was tied from the
checkpoint itself: a head with its own tensors in the files is untied, whatever the config says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.embeddings import embedding_scheme, pack_rows
from ..core.finite import non_finite_counts
from ..core.page_release import release_file_pages
from ..core.scheme import WeightScheme
from .quant_embedding import EMBEDDING_MODULES, QuantEmbedding, QuantOutputHead, TiedQuantHead


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    return (get_in() if get_in else None), (get_out() if get_out else None)


def embedding_names(model: nn.Module) -> tuple[str | None, str | None]:
    """Module names of the input embedding and of the output head (None where the model has none)."""
    inp, out = _embeddings(model)
    return _name_of(model, inp), _name_of(model, out)


def _refuse(fmt: str, what: str, name: str, module: nn.Module, supported: str) -> ValueError:
    return ValueError(
        f"embeddings={fmt!r}: the {what} {name!r} is a {type(module).__name__}, which hf_ptq cannot quantize "
        f"({supported}). Use embeddings=None to keep it in the model's dtype."
    )


def check_embedding_modules(model: nn.Module, fmt: str) -> None:
    """ValueError naming the module when the input embedding or the output head cannot be quantized: the input
    embedding must be an `nn.Embedding` (a subclass only when it just scales the rows, as Gemma's does: its
    `scalar_embed_scale`), without `max_norm`; the head an `nn.Linear`; neither offloaded by accelerate, and their
    weights finite (NonFiniteError; not checked on the meta device)."""
    inp, out = _embeddings(model)
    if isinstance(inp, EMBEDDING_MODULES) or isinstance(out, EMBEDDING_MODULES):
        raise ValueError(f"embeddings={fmt!r}: this model's embeddings are already quantized.")
    if inp is None:
        raise ValueError(
            f"embeddings={fmt!r}: {type(model).__name__} has no input embedding (get_input_embeddings()); use "
            "embeddings=None."
        )
    name = _name_of(model, inp)
    plain = type(inp).forward is nn.Embedding.forward or isinstance(getattr(inp, "scalar_embed_scale", None), float)
    if not isinstance(inp, nn.Embedding) or not plain or inp.max_norm is not None:
        raise _refuse(fmt, "input embedding", name, inp, "supported: nn.Embedding without max_norm")
    if out is not None and not isinstance(out, nn.Linear):
        raise _refuse(fmt, "output embedding", _name_of(model, out), out, "supported: nn.Linear")
    from accelerate.utils import has_offloaded_params

    offloaded = [m for m in (inp, out) if m is not None and has_offloaded_params(m)]
    if offloaded:
        raise ValueError(
            f"embeddings={fmt!r}: {_name_of(model, offloaded[0])!r} is offloaded by accelerate (device_map), which "
            "quantized embeddings do not support: keep the embeddings and lm_head on a device (device_map entries "
            "'cpu' or a GPU), or use embeddings=None."
        )
    for module in (inp, out):  # weights in memory (nothing to check on meta, before loading)
        if module is not None:
            _require_finite(module.weight, _name_of(model, module))


def _tied_by_config(model: nn.Module, in_name: str, out_name: str) -> bool:
    """Whether transformers would tie the head's weight to the embedding's (its tied-weights mapping says so)."""
    pair = {f"{in_name}.weight", f"{out_name}.weight"}
    mapping = getattr(model, "all_tied_weights_keys", None)
    if mapping is None and hasattr(model, "get_expanded_tied_weights_keys"):
        mapping = model.get_expanded_tied_weights_keys(all_submodels=True)
    return any({k, v} == pair for k, v in (mapping or {}).items())


def _checkpoint_keys(files: list[str] | None) -> set[str] | None:
    """Tensor names of the safetensors `files` (headers only); None when unknown (no files, or not safetensors)."""
    if not files or not all(str(f).endswith(".safetensors") for f in files):
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    for file in files:
        with safe_open(str(Path(file)), "pt") as f:
            keys.update(f.keys())
    return keys


def tied_on_load(model: nn.Module, checkpoint_files: list[str] | None, pre_quantized: bool) -> bool:
    """Whether the head is tied to the embedding in the checkpoint being loaded: transformers' mapping says so and
    the files hold no tensor of the head's own (`<head>.weight_packed` saved by hf_ptq, `<head>.weight` float)."""
    in_name, out_name = embedding_names(model)
    if in_name is None or out_name is None or not _tied_by_config(model, in_name, out_name):
        return False
    keys = _checkpoint_keys(checkpoint_files)
    own = f"{out_name}.weight_packed" if pre_quantized else f"{out_name}.weight"
    return keys is None or own not in keys


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.is_meta or b.is_meta:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.shape == b.shape


def _scheme(config: Any, hidden: int) -> WeightScheme:
    return embedding_scheme(config.embeddings, hidden, config.scheme.group_size, config.scheme.sym)


def untie_mapping(model: nn.Module, names: set[str]) -> None:
    """Remove the tied-weights entries touching the modules `names` from every `PreTrainedModel` in `model`
    (`_tied_weights_keys`, used when `tie_weights()` recomputes, and `all_tied_weights_keys`, used while loading):
    their `weight` Parameters are gone, the tie is the head's reference to the embedding."""
    from transformers import PreTrainedModel

    for prefix, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        head = f"{prefix}." if prefix else ""

        def touches(key: str, head: str = head) -> bool:
            return (head + key).rsplit(".", 1)[0] in names

        for attr in ("_tied_weights_keys", "all_tied_weights_keys"):
            mapping = getattr(sub, attr, None)
            if isinstance(mapping, dict) and any(touches(k) or touches(v) for k, v in mapping.items()):
                setattr(sub, attr, {k: v for k, v in mapping.items() if not (touches(k) or touches(v))})


def replace_embeddings(
    model: nn.Module, config: Any, dtype: torch.dtype, *, tied: bool, expect_float_weight: bool
) -> list[str]:
    """Swap the input embedding and the output head for empty quantized modules on the meta device (to load a
    checkpoint into, or, with `expect_float_weight`, for quantize-on-load: a meta placeholder `weight` routes the
    float weight there). Returns the names swapped."""
    check_embedding_modules(model, config.embeddings)
    inp, out = _embeddings(model)
    in_name, out_name = _name_of(model, inp), _name_of(model, out)
    scheme = _scheme(config, inp.embedding_dim)
    with torch.device("meta"):
        emb = QuantEmbedding(
            inp.num_embeddings,
            inp.embedding_dim,
            scheme,
            dtype,
            padding_idx=inp.padding_idx,
            embed_scale=getattr(inp, "scalar_embed_scale", None),
            compute_dtype=config.compute_dtype,
        )
        if expect_float_weight:
            emb.weight = nn.Parameter(torch.empty(inp.num_embeddings, inp.embedding_dim), requires_grad=False)
    model.set_submodule(in_name, emb)
    names = [in_name]
    if out is not None:
        with torch.device("meta"):
            if tied:
                head = TiedQuantHead(emb, bias=out.bias is not None)
            else:
                head = QuantOutputHead(
                    out.in_features, out.out_features, out.bias is not None, scheme, dtype, config.compute_dtype
                )
                if expect_float_weight:
                    head.weight = nn.Parameter(torch.empty(out.out_features, out.in_features), requires_grad=False)
        model.set_submodule(out_name, head)
        names.append(out_name)
    untie_mapping(model, set(names))
    return names


def _require_finite(weight: torch.Tensor, name: str) -> None:
    nans, infs = non_finite_counts(weight)
    if nans or infs:
        from ..core.finite import NonFiniteError

        raise NonFiniteError(
            f"hf_ptq: the weight of {name} holds {nans} NaN and {infs} inf value(s) (of {weight.numel()}); quantizing "
            "it would make its groups NaN. Repair the checkpoint, or keep it in the model's dtype with embeddings=None."
        )


@torch.no_grad()
def quantize_embeddings(model: nn.Module, config: Any) -> list[str]:
    """Replace the float input embedding and output head of `model` (in memory) by quantized ones holding their
    weights (tied when they share one weight); returns the names replaced. Nothing changes on error."""
    check_embedding_modules(model, config.embeddings)
    inp, out = _embeddings(model)
    in_name, out_name = _name_of(model, inp), _name_of(model, out)
    tied = out is not None and _same_storage(out.weight, inp.weight)
    scheme = _scheme(config, inp.embedding_dim)
    weight = inp.weight.detach()
    emb = QuantEmbedding(
        inp.num_embeddings,
        inp.embedding_dim,
        scheme,
        weight.dtype,
        padding_idx=inp.padding_idx,
        embed_scale=getattr(inp, "scalar_embed_scale", None),
        compute_dtype=config.compute_dtype,
        device="meta",
    )
    emb.to_empty(device=weight.device)
    emb.set_packed(pack_rows(weight, scheme, weight.dtype))
    head = None
    if out is not None:
        bias = None if out.bias is None else nn.Parameter(out.bias.detach().clone(), requires_grad=False)
        if tied:
            head = TiedQuantHead(emb)
        else:
            w = out.weight.detach()
            head = QuantOutputHead(
                out.in_features, out.out_features, False, scheme, w.dtype, config.compute_dtype, device="meta"
            )
            head.to_empty(device=w.device)
            head.set_packed(pack_rows(w, scheme, w.dtype))
        head.bias = bias
    model.set_submodule(in_name, emb)
    names = [in_name]
    if head is not None:
        release_file_pages(out.weight)
        model.set_submodule(out_name, head)
        names.append(out_name)
    release_file_pages(inp.weight)
    untie_mapping(model, set(names))
    return names


class _ScaledEmbedding(nn.Embedding):
    """An nn.Embedding whose rows are multiplied by a constant (a dequantized Gemma-style scaled embedding)."""

    def __init__(self, *args, embed_scale: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scalar_embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        return out * torch.tensor(self.scalar_embed_scale, device=out.device).to(out.dtype)


def embeddings_to_float(model: nn.Module) -> None:
    """Replace quantized embedding / head modules by `nn.Embedding` / `nn.Linear` of their dequantized weights
    (tied again where they were: one Parameter); for `model.dequantize()`."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, EMBEDDING_MODULES)}
    floats: dict[int, nn.Embedding] = {}
    for name, module in modules.items():
        if isinstance(module, QuantEmbedding):
            weight = module.dequantized_weight()
            kw = {"device": weight.device, "dtype": weight.dtype}
            if module.embed_scale is None:
                new = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, **kw)
            else:
                new = _ScaledEmbedding(
                    module.num_embeddings,
                    module.embedding_dim,
                    module.padding_idx,
                    embed_scale=module.embed_scale,
                    **kw,
                )
            new.weight.data.copy_(weight)
            floats[id(module)] = new
            model.set_submodule(name, new)
    for name, module in modules.items():
        if isinstance(module, QuantEmbedding):
            continue
        weight = floats[id(module.embedding)].weight if isinstance(module, TiedQuantHead) else None
        if weight is None:
            weight = nn.Parameter(module.dequantized_weight(), requires_grad=False)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = weight
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone())
        model.set_submodule(name, linear)
