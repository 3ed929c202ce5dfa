"""Fine-tuning hf_ptq models: peft LoRA adapters on the frozen quantized layers, and the preparation for training.

`install_peft_dispatch()` (run by `import hf_ptq`) makes peft's `get_peft_model` / `PeftModel.from_pretrained`
(and transformers' `add_adapter`, which needs peft >= 0.22) wrap `QuantLinear` and `W8A8Linear` in
`hf_ptq.finetune.lora.QuantLoraLinear`, through peft's custom-module mapping (`LoraConfig._register_custom_module`);
peft itself is imported only by its users.
"""

from .peft_dispatch import install_peft_dispatch
from .prepare import prepare_for_training

__all__ = ["install_peft_dispatch", "prepare_for_training"]
