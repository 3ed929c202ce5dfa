"""`PtqHfQuantizer`: what transformers calls around `from_pretrained` for a `PtqConfig`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils import logging

from ..core.finite import NonFiniteWeights
from ..folders import recover_folder
from ..formats.checksums import checksum_metadata
from ..formats.verify import checksums_on_load, verify_checkpoint
from ..methods import method_spec, require_package
from ..nn import QUANTIZED_MODULES, QuantLinear, quantizable_linears, replace_linears
from ..nn.quant_embedding import EMBEDDING_MODULES, PackedRows
from ..nn.replace import check_group_size
from ..nn.replace_embeddings import check_embedding_modules, embeddings_to_float, replace_embeddings, tied_on_load
from ..pipeline import calibrate_and_quantize
from ..pipeline.preflight import prepare_calibration, warn_unmatched_modules
from ..pipeline.sensitivity import check_search

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..config import PtqConfig

logger = logging.get_logger("hf_ptq")

# `MethodSpec.backend` -> the `PtqHfQuantizer` subclass that runs that library's modules (`register_backend`)
BACKEND_QUANTIZERS: dict[str, type[PtqHfQuantizer]] = {}


def register_backend(backend: str):
    """Class decorator: `cls` is the quantizer of the methods whose `MethodSpec.backend` is `backend`."""

    def wrap(cls: type[PtqHfQuantizer]) -> type[PtqHfQuantizer]:
        BACKEND_QUANTIZERS[backend] = cls
        return cls

    return wrap


class PtqHfQuantizer(HfQuantizer):
    """Quantize-on-load for calibration-free methods, calibrate-after-load for calibrated ones (GPTQ); rebuilds
    packed modules for saved hf_ptq checkpoints."""

    requires_calibration = False
    quantization_config: PtqConfig
    verify_checksums: bool | None = None  # None: as HF_PTQ_VERIFY_CHECKSUMS says (`formats.verify.checksums_on_load`)
    verify_report = None  # what the checks before loading a saved checkpoint found (`formats.verify.VerifyReport`)
    state_dict_to_save = None  # set by hf_ptq's `save_pretrained` when it is given a state dict
    tokenizer = None  # for text calibration data; set by `quantize_in_memory` (None: config.tokenizer, else the repo's)

    def __new__(cls, quantization_config: PtqConfig | None = None, **kwargs):
        """transformers maps one quant_method ("hf_ptq") to one class: methods whose weights live in another library's
        modules get that backend's subclass here (`BACKEND_QUANTIZERS`; bitsandbytes:
        `hf_ptq.quantizer.bnb.BnbHfQuantizer`). Without a config (`copy.deepcopy`), the class stays as it is."""
        backend = None if quantization_config is None else method_spec(quantization_config.method).backend
        if cls is PtqHfQuantizer and backend is not None:
            cls = BACKEND_QUANTIZERS[backend]
        return super().__new__(cls)

    def validate_environment(self, *args, **kwargs) -> None:
        """Quantizing with a wrapped method needs its package (ImportError naming the extra), before any weight is
        read; reloading hf_ptq's packed format needs nothing more."""
        if not self.pre_quantized:
            require_package(method_spec(self.quantization_config.method))

    @property
    def calibrating(self) -> bool:
        """True when this load quantizes with a calibrated method (float weights load first, then calibration)."""
        cfg = self.quantization_config
        return not self.pre_quantized and (method_spec(cfg.method).needs_calibration or cfg.target_bits is not None)

    def param_element_size(self, model: PreTrainedModel, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element of `param_name` once loaded, which transformers plans `device_map="auto"` /
        `max_memory` / disk offload with (`compute_module_sizes`). hf_ptq's empty modules already hold buffers of the
        shapes and dtypes that loading fills (packed codes, scales, zero points, shape, g_idx; W8A8's int8 weight), so
        those count as they are; the float placeholder `weight` of quantize-on-load, which the quantize op replaces by
        those buffers, counts 0."""
        module, tensor_name = get_module_from_name(model, param_name)
        if tensor_name == "weight" and isinstance(module, (QuantLinear, PackedRows)) and "weight" in module._parameters:
            return 0
        return super().param_element_size(model, param_name, param)

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or self.calibrating:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, (QuantLinear, PackedRows)) and tensor_name == "weight"

    def _process_model_before_weight_loading(self, model: PreTrainedModel, dtype: torch.dtype | None = None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, model._keep_in_fp32_modules, add_default_skips=True
        )
        self.non_finite = NonFiniteWeights()  # filled by quantize-on-load, raised after loading
        embeddings = getattr(cfg, "embeddings", None)
        if self.calibrating:  # float weights load normally; check what can fail before reading them
            targets = list(quantizable_linears(model, self.modules_to_not_convert))
            if cfg.target_bits is None:
                check_group_size(targets, cfg.scheme_for)
            else:  # the pinned layers as pinned; the others' candidates fit their shapes; the budget must hold them
                check_search(model, cfg, targets)
            if embeddings:  # quantized after calibration, which runs with the float embedding and head
                check_embedding_modules(model, embeddings)
            self._batches = prepare_calibration(model, cfg, self.tokenizer)  # checked; None: data-free
            names = self._targets = [n for n, _ in targets]  # names only: no float Linear stays referenced
        else:
            names = self._replace_modules(model, dtype or model.dtype)
            if embeddings:
                files = kwargs.get("checkpoint_files")
                tied = tied_on_load(model, files, self.pre_quantized)
                replace_embeddings(
                    model, cfg, dtype or model.dtype, tied=tied, expect_float_weight=not self.pre_quantized
                )
            if self.pre_quantized:
                self._verify(model, kwargs.get("checkpoint_files"))
            else:
                warn_unmatched_modules(model, cfg.modules_to_not_convert)
        if not names:
            logger.warning("hf_ptq: no Linear layer to quantize was found; the model is left in full precision.")
        return model

    @torch.no_grad()
    def quantize_in_memory(self, model: PreTrainedModel) -> PreTrainedModel:
        """Quantize a model whose float weights are in memory by this quantizer's own loading hooks, as
        `from_pretrained` runs them (`hf_ptq.quantize`): the before-hook swaps in the quantized modules, each float
        weight goes through the quantize op that loading streams it through (calibrated methods: the after-hook
        calibrates the float model), then the after-hook. Without calibration, an error puts the float modules back."""
        self.validate_environment()
        before = dict(model.named_modules())
        try:
            self.preprocess_model(model, dtype=model.dtype)
            if not self.calibrating:
                self._fill_swapped_modules(model, before)
                if getattr(self, "non_finite", None) is not None:
                    self.non_finite.raise_if_any()
        except BaseException:
            if not self.calibrating:
                _put_back(model, before)
                model.is_quantized = False
            raise
        self.postprocess_model(model)
        model.hf_quantizer = self
        return model

    def _fill_swapped_modules(self, model: PreTrainedModel, before: dict[str, torch.nn.Module]) -> None:
        """Give each module the before-hook swapped in what a checkpoint load would: the quantize op's tensors for
        the weight of the float module it replaced, that module's other tensors (bias) as they are."""
        quantize_op = self.get_quantize_ops()
        for name, original in before.items():
            new = _submodule_or_none(model, name)
            if not name or new is None or new is original:
                continue
            key = f"{name}.weight"
            if self.param_needs_quantization(model, key):
                tensors = quantize_op.convert({key: original.weight.detach()}, model=model, full_layer_name=key)
                for full_name, tensor in tensors.items():
                    _set_tensor(model, full_name, tensor)
            _take_remaining_tensors(new, original, name)
            new.train(original.training)  # bitsandbytes picks its CPU inference kernel in eval mode only

    def _verify(self, model: PreTrainedModel, checkpoint_files: list[str] | None) -> None:
        """Check the checkpoint against the quantized modules just built from its config, before any weight is
        read (CheckpointError naming what is wrong); see `hf_ptq.formats.verify`."""
        if not checkpoint_files:
            logger.warning("hf_ptq: no checkpoint files to verify (loading from a state dict?): tensors not checked.")
            return
        checksums = checksums_on_load() if self.verify_checksums is None else self.verify_checksums
        notes = recover_folder(os.path.dirname(os.path.abspath(checkpoint_files[0])))
        self.verify_report = verify_checkpoint(model, self.quantization_config, checkpoint_files, checksums)
        self.verify_report.notes[:0] = notes
        logger.info("hf_ptq: %s", self.verify_report.summary())

    def _replace_modules(self, model: PreTrainedModel, dtype: torch.dtype) -> list[str]:
        """Swap the target Linears for empty quantized modules that the checkpoint (or quantize-on-load) fills."""
        cfg = self.quantization_config
        return replace_linears(
            model,
            scheme_of=cfg.scheme_for,
            skip=self.modules_to_not_convert,
            dtype=dtype,
            compute_dtype=cfg.compute_dtype,
            act_order_of=cfg.act_order_for if self.pre_quantized else lambda scheme: False,
            expect_float_weight=not self.pre_quantized,
            float_zero_point=method_spec(cfg.method).float_zero_point,
        )

    def model_tags(self) -> list[str]:
        """Hub tags of a model quantized with this config."""
        cfg = self.quantization_config
        return ["hf-ptq", cfg.method, "mixed-precision" if cfg.mixed else f"{cfg.bits}-bit"]

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        from ..formats.save import attach_model_methods

        if getattr(self, "non_finite", None) is not None:
            self.non_finite.raise_if_any()
        if self.calibrating:
            batches, self._batches = self._batches, None
            calibrate_and_quantize(model, self.quantization_config, self._targets, batches)
        model.add_model_tags(self.model_tags())
        attach_model_methods(model)
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        """transformers' own state dict, and the SHA-256 of each of its tensors for the safetensors metadata."""
        state = self.state_dict_to_save if self.state_dict_to_save is not None else model.state_dict()
        return None, checksum_metadata(state)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on every hf_ptq layer: peft LoRA wraps them (`hf_ptq.finetune`), gradients flow through the
        frozen packed weights (`hf_ptq.nn.frozen_grad`)."""
        return True

    def get_quantize_ops(self):
        from .ops import QuantizeOnLoad

        return QuantizeOnLoad(self)

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None):
        """Replace every quantized module by an `nn.Linear` holding its dequantized weight (quantized embeddings and
        heads by `nn.Embedding` / `nn.Linear`, tied again where they were)."""
        if any(isinstance(m, EMBEDDING_MODULES) for m in model.modules()):
            embeddings_to_float(model)
        for name, module in list(model.named_modules()):
            if isinstance(module, QUANTIZED_MODULES):
                weight = module.dequantized_weight(dtype or module.weight_scale.dtype)
                linear = torch.nn.Linear(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    device=weight.device,
                    dtype=weight.dtype,
                )
                linear.weight.data.copy_(weight)
                if module.bias is not None:
                    linear.bias.data.copy_(module.bias)
                model.set_submodule(name, linear)
        return model


def _submodule_or_none(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _set_tensor(model: torch.nn.Module, full_name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` where a checkpoint's `full_name` entry goes: a parameter (frozen) or a buffer of its module."""
    module_name, _, attr = full_name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = (
            tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor, requires_grad=False)
        )
    else:
        module._buffers[attr] = tensor


def _take_remaining_tensors(new: torch.nn.Module, original: torch.nn.Module, name: str) -> None:
    """The tensors of `new` still on the meta device (a bias) from `original`'s tensors of the same names."""
    for attr, tensor in [*new.named_parameters(recurse=False), *new.named_buffers(recurse=False)]:
        if not tensor.is_meta:
            continue
        source = getattr(original, attr, None)
        if not isinstance(source, torch.Tensor) or source.is_meta:
            raise RuntimeError(f"hf_ptq: {name}.{attr} was left unfilled while quantizing in memory")
        _set_tensor(new, attr, source.detach())


def _put_back(model: torch.nn.Module, before: dict[str, torch.nn.Module]) -> None:
    """Restore every module swapped since `before` (name -> module), outermost first."""
    for name in sorted(before, key=lambda n: n.count(".")):
        if name and _submodule_or_none(model, name) is not before[name]:
            model.set_submodule(name, before[name])
