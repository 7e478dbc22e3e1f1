"""The stage library: GEMV, RMSNorm, activations, RoPE, softmax, residual, ..."""
