"""Register hf_ptq's LoRA layers with every peft `LoraConfig` that meets an hf_ptq layer, without importing peft.

peft picks the LoRA class of a target layer in `LoraModel._create_new_module(lora_config, adapter_name, target)`;
its extension point for layer types it does not know is the config's custom-module mapping
(`LoraConfig._register_custom_module`, peft's docs "Custom models"). That mapping is not saved with an adapter, so
a reloaded adapter (`PeftModel.from_pretrained`) would need it registered again by hand: instead, the first time
peft is asked to wrap a `QuantLinear` / `W8A8Linear`, the mapping is registered on the config it was given. The
hook goes in when `peft.tuners.lora.model` is imported (now, if it already is), so `import hf_ptq` costs no peft
import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType, SimpleNamespace

from ..nn import QuantLinear, W8A8Linear

PEFT_LORA_MODEL = "peft.tuners.lora.model"
HF_PTQ_LAYERS = (QuantLinear, W8A8Linear)


def install_peft_dispatch() -> None:
    """Hook hf_ptq's layers into peft's LoRA dispatch: at once if peft's LoRA is imported, else when it is."""
    module = sys.modules.get(PEFT_LORA_MODEL)
    if module is not None:
        _hook(module)
    elif not any(isinstance(finder, _HookOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HookOnImport())


def _hook(module: ModuleType) -> None:
    """Wrap `LoraModel._create_new_module` (once) so that a target holding an hf_ptq layer registers the mapping, and
    `_replace_module` so that placing its adapter reads the device off the layer's scales."""
    lora_model = getattr(module, "LoraModel", None)
    current = None if lora_model is None else lora_model.__dict__.get("_create_new_module")
    create = getattr(current, "__func__", current)
    if create is None or getattr(create, "hf_ptq_dispatch", False):
        return

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if isinstance(base, HF_PTQ_LAYERS):
            from .lora import register_lora_layers

            register_lora_layers(lora_config)
        return create(lora_config, adapter_name, target, **kwargs)

    create_new_module.hf_ptq_dispatch = True
    lora_model._create_new_module = staticmethod(create_new_module)
    replace = lora_model._replace_module

    def replace_module(self, parent, child_name, new_module, child):
        base = getattr(child, "base_layer", child)
        if isinstance(base, HF_PTQ_LAYERS):  # peft reads `child.weight` for the device: a whole dequantization
            child = SimpleNamespace(weight=base.weight_scale)  # per adapter submodule; the scales say it for free
        return replace(self, parent, child_name, new_module, child)

    lora_model._replace_module = replace_module


class _HookOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `peft.tuners.lora.model` is about to load, wraps its loader so that the module is
    hooked right after it executes (the finder then steps out of `sys.meta_path`)."""

    def find_spec(self, name, path, target=None):
        if name != PEFT_LORA_MODEL:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _HookingLoader(spec.loader)
        return spec


class _HookingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _hook(module)
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _HookOnImport)]
