"""On-disk formats: the native (compressed-tensors-named) checkpoint, model cards and Hub uploads."""
