"""The inputs of one Llama-3-8B decode block (4-bit, group 64, fp16, one token), seeded.

Shared by the diagnostics in this folder, so that they profile the same arrays.
"""

from types import SimpleNamespace


def decode_block(dtype=None):
    """Activations, norm weight and the seven projections of one block, in ``dtype``
    (activations, norm weight, scales and biases; default float16).

    Returns:
        SimpleNamespace: ``x4``/``x14`` (rows of 4096 / 14336), ``r4`` (a residual),
        ``g`` (RMSNorm weight), ``wq wk wv wo wg wu wd`` (``ops.Weight``), ``du``/``dd``
        (dense weights of the up and down shapes, 4096 -> 14336 and 14336 -> 4096, as
        the bench's fp16 linears), and ``qkv`` (the keyword arguments of
        ``ops.norm_qkv_rope``). The arrays are lazy: a tool pays only for those it uses.
    """
    import mlx.core as mx

    from mlx_foundry.bench.cases import _dense_w, _qweight
    from mlx_foundry.ops.weights import Weight

    dt = mx.float16 if dtype is None else dtype

    def qw(i, n, k):
        return Weight(*_qweight(0, i, n, k, 4, 64, dt), group_size=64, bits=4)

    def act(k, seed):
        return mx.random.normal((1, k), key=mx.random.key(seed)).astype(dt)

    return SimpleNamespace(
        g=(1 + 0.1 * mx.random.normal((4096,), key=mx.random.key(5))).astype(dt),
        x4=act(4096, 1), x14=act(14336, 2), r4=act(4096, 3),
        wu=qw(1, 14336, 4096), wg=qw(2, 14336, 4096), wd=qw(3, 4096, 14336),
        wo=qw(4, 4096, 4096), wq=qw(6, 4096, 4096), wk=qw(7, 1024, 4096),
        wv=qw(8, 1024, 4096),
        du=_dense_w(0, 21, 14336, 4096, dt), dd=_dense_w(0, 22, 4096, 14336, dt),
        qkv=dict(n_heads=32, n_kv_heads=8, head_dim=128, offset=7, rope_base=500000.0))
