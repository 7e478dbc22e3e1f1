"""User-facing fused ops: validated inputs, a ``backend=`` keyword, a reference each.

Decode-sized inputs run as fused kernels; many rows (prefill) route to MLX's own
matmul / quantized_matmul where that is measured faster.
"""

from .attention import decode_attention
from .linear import linear, norm_gate_up_swiglu, norm_linear, norm_qkv_rope
from .norm import add_rms_norm, rms_norm, rope, softmax
from .qk_norm import qk_norm_rope
from .weights import Weight

__all__ = ["Weight", "add_rms_norm", "decode_attention", "linear", "norm_gate_up_swiglu",
           "norm_linear", "norm_qkv_rope", "qk_norm_rope", "rms_norm", "rope", "softmax"]
