"""User-facing fused ops: validated inputs, a ``backend=`` keyword, a reference each.

Decode-sized inputs run as fused kernels; many rows (prefill) route to MLX's own
matmul / quantized_matmul where that is measured faster.
"""

from .linear import linear, norm_gate_up_swiglu, norm_linear, norm_qkv_rope  # noqa: E402,F401
from .weights import Weight  # noqa: E402,F401
from .norm import rms_norm, add_rms_norm, rope, softmax
