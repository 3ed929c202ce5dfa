"""On-disk formats: exports to compressed-tensors, GGUF and GPTQ (`export`), model cards and Hub uploads."""
