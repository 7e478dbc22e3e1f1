"""User-facing fused ops: validated inputs, a ``backend=`` keyword, a reference each.

Decode-sized inputs run as fused kernels; many rows (prefill) route to MLX's own
matmul / quantized_matmul where that is measured faster.
"""
