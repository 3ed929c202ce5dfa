"""Quantizers that run GPTQ, AWQ and compressed-tensors checkpoints (made by other tools) on hf_ptq's modules.

transformers maps each `quant_method` to one quantizer class; `import hf_ptq` maps "gptq", "awq" and
"compressed-tensors" to the classes here (`hf_ptq.registration.take_over`). Each class hands a load to the quantizer
transformers ships when hf_ptq should not take it (quantizing a float model with transformers' own config, or the
user chose that backend: `hf_ptq.quantizer.backends`); otherwise:
1. before weights load: refuse settings hf_ptq does not run (naming the field), read the safetensors headers, put a
   module for each quantized Linear the files hold (hf_ptq's own where the layout already is hf_ptq's, a
   `CheckpointLinear` shell otherwise) and check the tensors against them (`hf_ptq.formats.verify`);
2. after: convert the shells into `QuantLinear`s one by one, and make the model what hf_ptq would have built itself:
   its config a `PtqConfig` / `SmoothQuantConfig` (recording where it came from) and its quantizer hf_ptq's, so that
   `save_pretrained`, `export`, `evaluate` and `push_to_hub` work as on any hf_ptq model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from transformers.quantizers import auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging

from ..formats import compressed_tensors as compressed_tensors_export
from ..formats.layers import float_linears
from ..formats.safetensors_file import CheckpointError, read_header
from ..formats.third_party import awq, compressed_tensors, gptq
from ..formats.third_party.compressed_tensors import CompressedTensorsCheckpointConfig
from ..formats.third_party.shell import CheckpointLinear
from ..formats.verify import verify_checkpoint
from ..nn import QuantLinear, W8A8Linear
from .backends import HF_PTQ, backend_for

logger = logging.get_logger("hf_ptq")


class CheckpointHfQuantizer(HfQuantizer):
    """Base of the loaders of other tools' checkpoints; subclasses name the quant_method and its reader."""

    requires_calibration = True  # loads quantized checkpoints only; quantizing goes to transformers' quantizer
    quant_method_name = ""
    tool = ""  # how the log line names the format
    reader: ModuleType
    original: type[HfQuantizer] | None = None  # transformers' own quantizer, set by `registration.take_over`

    packages: tuple[str, ...] = ()  # what transformers' own loader of the format needs (import names)

    def __new__(cls, quantization_config: Any = None, **kwargs: Any):
        """transformers' own quantizer where hf_ptq should not take the load: quantizing a float model, the user
        chose transformers' backend, or a setting hf_ptq does not run while that loader's packages are installed
        (without them the setting is refused here, naming the field, before any weight is read)."""
        if quantization_config is None:  # copy.deepcopy
            return super().__new__(cls)
        if cls.original is not None and (
            not kwargs.get("pre_quantized", True) or backend_for(cls.quant_method_name) != HF_PTQ
        ):
            return cls.original(cls.original_config(quantization_config), **kwargs)
        try:
            cls.reader.check_config(quantization_config)
        except ValueError as err:
            if cls.original is None or not all(importlib.util.find_spec(p) for p in cls.packages):
                raise
            logger.warning(
                f"hf_ptq does not run this {cls.tool} checkpoint ({str(err).split(': ', 1)[-1].split('. ')[0]}); "
                f"transformers' own loader takes it ({', '.join(cls.packages)} installed)."
            )
            return cls.original(cls.original_config(quantization_config), **kwargs)
        return super().__new__(cls)

    @classmethod
    def original_config(cls, quantization_config: Any) -> Any:
        """`quantization_config` as transformers' own quantizer takes it."""
        return quantization_config

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def _process_model_before_weight_loading(self, model, dtype: torch.dtype | None = None, **kwargs: Any):
        files = [Path(f) for f in kwargs.get("checkpoint_files") or []]
        if not files:
            raise CheckpointError(f"hf_ptq loads {self.tool} checkpoints from safetensors files; none were given.")
        pickled = [f.name for f in files if f.suffix != ".safetensors"]
        if pickled:
            raise CheckpointError(
                f"{pickled[0]}: hf_ptq reads {self.tool} checkpoints from safetensors files only (a pickle file can "
                "run code when it is loaded). Use the model's safetensors revision, or transformers' own loader: "
                f"hf_ptq.use_backend({self.quant_method_name!r}, 'transformers')."
            )
        tensors = {name: entry for f in files for name, entry in read_header(f).tensors.items()}
        dtype = dtype or model.dtype
        self.layer_names = []
        for name, module in list(model.named_modules()):
            if type(module) is not nn.Linear:
                continue
            with torch.device("meta"):
                layer = self.reader.layer_for(self.quantization_config, name, module, tensors, dtype)
            if layer is not None:
                model.set_submodule(name, layer)
                self.layer_names.append(name)
        if not self.layer_names:
            raise CheckpointError(
                f"{files[0].parent}: its config says {self.tool}, but the checkpoint holds no quantized Linear "
                "(no qweight / weight_packed / int8 weight tensors under the model's Linear layers)."
            )
        self.verify_report = verify_checkpoint(model, self.quantization_config, files, checksums=False)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        from ..formats.save import attach_model_methods

        shells = [n for n, m in model.named_modules() if isinstance(m, CheckpointLinear)]
        facts = [model.get_submodule(n).facts() for n in shells]
        direct = [m for m in model.modules() if isinstance(m, QuantLinear)]
        sym = all(s for s, _ in facts) and all(m.sym for m in direct)
        act_order = any(a for _, a in facts) or any(m.weight_g_idx is not None for m in direct)
        del direct
        # one layer at a time, holding no other reference to the shell: its tensors are freed as soon as it is
        # replaced, so the model holds at most one layer twice
        for name in logging.tqdm(shells, desc=f"hf_ptq: {self.tool} layers", unit="layer", leave=False):
            model.set_submodule(name, model.get_submodule(name).convert(sym, act_order))
        self._dequantize_output_embedding(model)
        own = self._own_quantizer(model, sym, act_order)
        model.hf_quantizer = own
        model.config.quantization_config = own.quantization_config
        model.quantization_method = own.quantization_config.quant_method
        model.add_model_tags(own.model_tags())
        attach_model_methods(model)
        logger.warning(
            f"hf_ptq runs this {self.reader.describe(self.quantization_config)} checkpoint on its own kernels "
            f"({len(self.layer_names)} layers as {own.quantization_config.describe()}); for transformers' "
            f"loader instead: hf_ptq.use_backend({self.quant_method_name!r}, 'transformers')."
        )
        return model

    def _dequantize_output_embedding(self, model) -> None:
        """A quantized `lm_head` (gptqmodel's `lm_head: true`) becomes a float Linear of its dequantized weight:
        hf_ptq keeps the output embedding in full precision, so this is what its config can describe and reload;
        the logits are those of the quantized weights."""
        head = model.get_output_embeddings()
        if not isinstance(head, QuantLinear):
            return
        name = next(n for n, m in model.named_modules() if m is head)
        linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        linear.weight = nn.Parameter(head.dequantized_weight(), requires_grad=False)
        if head.bias is not None:
            linear.bias = nn.Parameter(head.bias.detach().clone(), requires_grad=False)
        model.set_submodule(name, linear)
        self.layer_names.remove(name)
        logger.warning(
            f"hf_ptq: this {self.tool} checkpoint quantizes the output embedding {name!r}; hf_ptq keeps it in full "
            f"precision, so it holds the dequantized weight ({head.out_features} x {head.in_features}, "
            f"{head.weight_scale.dtype}): the same logits, more memory."
        )

    def _own_quantizer(self, model, sym: bool, act_order: bool) -> HfQuantizer:
        """hf_ptq's quantizer and config for the converted model (what reloading its save_pretrained builds)."""
        from ..config import PtqConfig
        from ..smoothquant_config import SmoothQuantConfig
        from .hf_quantizer import PtqHfQuantizer
        from .smoothquant_quantizer import SmoothQuantHfQuantizer

        source = {"quant_method": self.quant_method_name, "quantization_config": self.quantization_config.to_dict()}
        skipped = float_linears(model)
        w8a8 = [m for m in model.modules() if isinstance(m, W8A8Linear)]
        if w8a8:
            if any(isinstance(m, QuantLinear) for m in model.modules()):
                raise CheckpointError(f"this {self.tool} checkpoint mixes W8A8 and weight-only layers")
            static = w8a8[0].static
            config = SmoothQuantConfig(
                activations="static" if static else "dynamic", modules_to_not_convert=skipped, converted_from=source
            )
            return SmoothQuantHfQuantizer(config, pre_quantized=True)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        schemes = {(m.bits, m.group_size) for m in layers}
        if len(schemes) != 1:
            raise CheckpointError(f"this {self.tool} checkpoint mixes layer schemes {sorted(schemes)}")
        bits, group_size = schemes.pop()
        method = {"awq": "awq"}.get(self.quant_method_name, "gptq" if act_order or self.reader is gptq else "rtn")
        fields: dict[str, Any] = {"desc_act": act_order, "static_groups": False} if method == "gptq" else {}
        config = PtqConfig(
            method=method,
            bits=bits,
            group_size=group_size,
            sym=sym,
            modules_to_not_convert=skipped,
            converted_from=source,
            **fields,
        )
        return PtqHfQuantizer(config, pre_quantized=True)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # the layers become hf_ptq's own after loading (`PtqHfQuantizer.is_trainable`)


class GptqCheckpointHfQuantizer(CheckpointHfQuantizer):
    quant_method_name, tool, reader = "gptq", "GPTQ", gptq
    packages = ("optimum", "gptqmodel")


class AwqCheckpointHfQuantizer(CheckpointHfQuantizer):
    quant_method_name, tool, reader = "awq", "AWQ", awq
    packages = ("gptqmodel",)


class CompressedTensorsCheckpointHfQuantizer(CheckpointHfQuantizer):
    """compressed-tensors checkpoints; hf_ptq's own (its config nested under "hf_ptq", written by
    `save_pretrained`) get hf_ptq's quantizer for that config, as if saved with `quant_method: "hf_ptq"`."""

    quant_method_name, tool, reader = "compressed-tensors", "compressed-tensors", compressed_tensors
    packages = ("compressed_tensors",)

    @classmethod
    def original_config(cls, quantization_config: Any) -> Any:
        """transformers' `CompressedTensorsConfig` of the saved block (it needs the compressed-tensors package)."""
        if not isinstance(quantization_config, CompressedTensorsCheckpointConfig):
            return quantization_config
        original = auto.AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"].original
        return original.from_dict(quantization_config.to_dict())

    def __new__(cls, quantization_config: Any = None, **kwargs: Any):
        own = _own_config(quantization_config)
        if own is not None and kwargs.get("pre_quantized", True) and backend_for(cls.quant_method_name) == HF_PTQ:
            return auto.AUTO_QUANTIZER_MAPPING[own.quant_method](own, **kwargs)
        return super().__new__(cls, quantization_config, **kwargs)


def _own_config(quantization_config: Any) -> Any:
    """hf_ptq's config nested in a compressed-tensors block written by hf_ptq's `save_pretrained`, else None."""
    from ..own_methods import refuse_unknown_own_method

    if not isinstance(quantization_config, CompressedTensorsCheckpointConfig):
        return None
    nested = quantization_config.to_dict().get(compressed_tensors_export.HF_PTQ_KEY)
    if not isinstance(nested, dict):
        return None
    refuse_unknown_own_method(nested)
    name = nested.get("quant_method")
    if not (isinstance(name, str) and name.startswith("hf_ptq")) or name not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        raise ValueError(f"config.json's quantization_config.hf_ptq.quant_method={name!r} is not hf_ptq's")
    return auto.AUTO_QUANTIZATION_CONFIG_MAPPING[name].from_dict(nested)


QUANTIZERS = (GptqCheckpointHfQuantizer, AwqCheckpointHfQuantizer, CompressedTensorsCheckpointHfQuantizer)
