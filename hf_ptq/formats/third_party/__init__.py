"""Readers of checkpoints other tools wrote (GPTQ, AWQ, compressed-tensors): the modules their tensors load into
and the conversion into hf_ptq's packed modules. The quantizers that use them: `hf_ptq.quantizer.third_party`."""

TAKEN_OVER = ("gptq", "awq", "compressed-tensors")  # the quant_methods `import hf_ptq` loads (docs/loading.md)
