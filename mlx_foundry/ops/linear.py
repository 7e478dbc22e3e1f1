"""Fused linear ops for the decode path: GEMV + epilogues, norm + GEMV, gate/up + SwiGLU,
norm + Q/K/V + RoPE.

Few rows (decode) run as one fused kernel; more than :data:`PREFILL_ROWS` rows
(prefill, a GEMM) route to MLX's own ``matmul`` / ``quantized_matmul`` with the
same results. The ``reference`` backend always runs the fused kernel's reference
(plain MLX ops in float32).
"""

import functools

import mlx.core as mx

from ..args import Output
from ..backends import BACKENDS, select_backend
from ..compound import CompoundKernel
from ..kernel import drop_prepared, launch_epoch, recording
from ..stages.activations import ACTIVATIONS
from ..stages.epilogues import (activation_epilogue, bias_epilogue, residual_epilogue,
                                scale_epilogue, swiglu_epilogue)
from ..stages.gemv import (DEFAULT_MBLOCK, DEFAULT_ROWS, DEFAULT_SPLITK, DEFAULT_THREADS,
                           DEFAULT_UNROLL, check_launch, gemv_decls, gemv_dispatch,
                           gemv_dual_stage, gemv_stage, qkv_rope_stage)
from . import _calls, _rope
from ._checks import check_eps, check_float_array, in_dtype_of
from .weights import Weight, policy_for

PREFILL_ROWS = 7
"""Inputs with more rows than this (``x.size // K``) use MLX's matmul/quantized_matmul
instead of the fused GEMV kernels.

Measured with ``python -m mlx_foundry bench`` (4-bit 4096 -> 14336, MLX 0.32.4): on an
NVIDIA H100 (2026-11-28, commit c08f3c3, docs/bench_journal.md session 32) the fused
kernel is 2.88x / 4.41x / 5.15x / 5.15x faster than ``mx.quantized_matmul`` at 2 / 4 /
6 / 7 rows (several rows of ``x`` per SIMD-group, see :func:`_mblock`) and 0.69x at 8
rows, where MLX switches from its one-row kernel to its GEMM; on an H200 (session 30)
the same up to 6 rows and 0.68x at 8. On an H100 in session 33 (two runs;
docs/bench_journal.md): 8-bit 3.77x / 3.89x at 7 rows and 0.83x / 0.81x at 8; dense
0.98x at 7 (the same read for both kernels, even within the bench's noise) and 0.94x at
8. After its table, ``bench`` says whether this value fits the device it ran on, per
weight format (``mlx_foundry/bench/prefill.py``). Set it on the module
(``mlx_foundry.ops.linear`` is the function once the package is imported)::

    importlib.import_module("mlx_foundry.ops.linear").PREFILL_ROWS = 16
"""

MAX_FUSED_ROWS = 65535  # batch rows on grid x: far past any PREFILL_ROWS worth setting


# ---- validation -------------------------------------------------------------------------
def _check_x(x, k, who, min_ndim=1):
    check_float_array(who, "x", x, min_ndim=min_ndim)
    if x.shape[-1] != k:
        raise ValueError(f"[{who}] The last dimension of 'x' must equal the weight's input "
                         f"dimension K={k} but 'x' has shape {tuple(x.shape)}.")


def _check_activation(activation, who):
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"[{who}] 'activation' must be None or one of "
                         f"{', '.join(ACTIVATIONS)} but got {activation!r}.")


def _check_residual(residual, shape, who):
    check_float_array(who, "residual", residual, shape=shape, none_ok=True)


def _check_norm(norm_weight, eps, k, who):
    check_float_array(who, "norm_weight", norm_weight, shape=(k,), none_ok=True)
    check_eps(who, eps)


def _as_weight(w, name, who):
    if not isinstance(w, Weight):
        raise TypeError(f"[{who}] '{name}' must be a mlx_foundry.ops.Weight but got "
                        f"{type(w).__name__} (use Weight(...) or Weight.from_module(layer)).")
    try:
        return w.validate(who)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e} (in '{name}')") from None


def _fused(backend, rows, who):
    """Backend to run and whether the fused kernel runs (else MLX's matmul)."""
    be = select_backend(backend, who)
    if be == "reference":
        return be, True
    return be, rows <= min(PREFILL_ROWS, MAX_FUSED_ROWS)


_TUNED = {}


def _launch(kern, w, x, backend, *, n=None, head_dim=None, dual=False):
    """The GEMV launch constants ``ROWS``, ``THREADS``, ``SPLITK``, ``UNROLL`` (and
    ``MBLOCK`` but for the Q/K/V kernel) for this call.

    The tuner's stored choice for this device, MLX version, kernel source and shape
    class (``python -m mlx_foundry bench --tune`` writes them), else
    :func:`default_launch`. ``n``: output rows when they are not ``w``'s (Q/K/V: all
    three projections); ``head_dim``: ``ROWS`` must divide it (Q/K/V: RoPE pairs stay in
    one SIMD-group). Resolved once per kernel, backend and shape: afterwards one
    dictionary lookup.
    """
    n = w.out_features if n is None else n
    key = (kern.name, backend, n, w.in_features, x.size // x.shape[-1], head_dim, dual,
           not w.quantized, x.dtype)
    params = _TUNED.get(key)
    if params is None:
        params = _TUNED[key] = _resolve_launch(kern, backend, *key[2:])
    return params


def forget_launches():
    """Drop the launch constants resolved so far (a tuning run stored new ones), and the
    launches the ops prepared with them."""
    _TUNED.clear()
    drop_prepared()


SPLIT_MIN_K = 2048
"""Untuned GEMVs split K when ``K >= N`` and ``K >=`` this (see :func:`default_launch`)."""

NO_SPLIT_MIN_N = 4096
"""With 4 to 7 rows of ``x``, untuned GEMVs with ``K >= N`` drop split K for eight rows
per SIMD-group when ``N >=`` this: enough threadgroups without it (measured at 4096; see
:func:`default_launch`)."""


BOUNDED_MIN_BLOCKS = 4
"""``MINBLOCKS`` of the untuned launches that take a register bound (see
:func:`default_launch`)."""

SQUARE_ROWS = 2
"""Rows per SIMD-group of the untuned launch of quantized weights with ``n <= k < 2 n`` at
one row of ``x`` (o_proj), without split K (see :func:`default_launch`)."""

DENSE_MAX_RATIO = 4
"""Dense weights get their own untuned launch while ``k / 4 <= n <= 4 k`` (see
:func:`default_launch`; measured at ``n = 3.5 k`` and ``k = 3.5 n``)."""


def default_launch(n, k, *, head_dim=None, m=1, dual=False, dense=False, dtype=None):
    """The untuned GEMV launch constants for ``n`` output rows of ``k`` elements and ``m``
    rows of ``x`` (``dual``: the gate/up kernel; ``head_dim``: the Q/K/V kernel, which
    takes one row of ``x`` per threadgroup and no ``MBLOCK``; ``dense``: unquantized
    weights; ``dtype``: ``x``'s, for the register bound below).

    From kernel durations measured with ncu on an H100 (4-bit, decode, one row of x,
    L2 flushed; ``docs/ncu_h100_gemv.md``): for ``n`` = 4096, ``k`` = 14336, four rows
    per SIMD-group leave the SMs ~8 SIMD-groups each (47% of DRAM bandwidth, 21 us);
    eight rows with the threadgroup's four SIMD-groups splitting K reach 59-61%
    (16-17 us). At ``k == n`` (o_proj, 4096 -> 4096) four rows with split K took
    8.2 us against 8.7 us without; since one row of ``x`` is staged in threadgroup
    memory (0843fe5), two rows without split K take 7.6 us against 8.2-8.7 us for four
    with split (56 against 64 registers, medians of five launches; ``SQUARE_ROWS``:
    quantized weights with ``n <= k < 2 n``, measured at 4-bit ``k == n`` only; section
    15 of ``docs/ncu_h100_gemv.md``). Layers with ``k < n`` (Q/K/V 4096 -> 6144, gate/up
    4096 -> 14336) are as fast or faster with four rows and no split. With 4 to 7 rows
    of ``x`` the layers with ``k >= n`` and ``n >= 4096`` have enough threadgroups
    without split K: eight rows, two blocks of rows of ``x`` (4096 -> 4096 at ``m`` = 4 /
    6: 14.3 / 17.9 -> 12.0 / 14.1 us; 14336 -> 4096: 32.8 / 44.3 -> 30.4 / 37.4 us), and
    so with 7 rows (14336 -> 4096, the tuner's chained calls on an H100, session 32: 57.4
    against 66.5 us for four rows with split K; 4096 -> 4096 at 7, session 33: the
    tuner's best of 20 launches, 30.5 us, ``docs/tune_m7_sq_h100_s33.json``). With
    fewer output rows that grid is under one threadgroup per SM, which loses (measured at
    ``n`` = 4096 with half the threadgroups), so they keep split K. At 3 rows of ``x``
    (``n >= 4096``) the best launch measured depends on ``k / n``: 4096 -> 4096 four
    rows without split (12.8 -> 11.6 us), 14336 -> 4096 eight rows with split (29.3 ->
    28.4 us). ``MBLOCK``: see :func:`_mblock`.

    Dense weights, one row of ``x``, ``k >= SPLIT_MIN_K`` and ``k / 4 <= n <= 4 k``: two
    rows and 256 threads splitting K (eight SIMD-groups, one threadgroup per two output
    rows: 93% of the warp slots busy at 32 registers). On an H200 (ncu, one launch, L2
    flushed; fp16 4096 -> 14336 / 14336 -> 4096, 117 MB): 28.5 / 28.6 us against 31.7 /
    33.0 us for the launches it replaced (eight rows; 256 threads with split K for
    ``k < n``, 128 threads for ``k >= 2 n``) and 30.9 us for MLX's ``gemv_single``
    (14336 -> 4096); in the bench, two alternating rounds each, 1.003x / 1.006x and
    1.012x / 1.014x ``x @ w.T`` against 0.983x / 0.997x and 0.975x / 1.016x
    (``docs/dense_launch_ab_h200.txt``). On H100s every dense launch measured read at
    the limit of a plain read (0.97-1.02x MLX; ``docs/tune_dense_h100.json``); this one
    1.01x / 1.01x in the full run of 235ebd8 (docs/bench_journal.md). Not measured at other
    shapes: square weights take it by interpolation, while a vocabulary head (``n`` far
    past ``4 k``) and short rows keep the rules above.

    ``UNROLL``: 1 everywhere. Unrolling the loop over ``K`` by 2 / 4 took -3% to +7% /
    0 to +14% of the time at the six 4-bit decode launches, tuned on an H100
    (``docs/tune_unroll_h100.json``); the tuner may choose otherwise per device.

    ``MINBLOCKS`` (a register bound for the CUDA build, ``__launch_bounds__(THREADS, 4)``:
    at most 128 registers; no effect on Metal), measured with ncu on an H100 at 4-bit
    (``docs/ncu_h100_gemv.md`` section 18): the quantized gate/up kernel at one row of
    ``x`` (fp16 28.8-29.1 -> 27.8-27.9 us, bf16 29.3-29.5 -> 28.0-28.8 us, same 128
    registers: ptxas schedules for the bound) and, with ``bfloat16`` ``x`` only, the
    tall split-K launch (14336 -> 4096: 135 registers, three threadgroups per SM ->
    128, four; 21.4 -> 17.3 us). The fp16 tall launch is 128 registers already and
    slower bounded (16.3 -> 17.1 us), as is gate/up at eight rows (the tall gate/up
    launch: 37 -> 60-67 us); a bound of 5 (96 registers) spilled and lost everywhere.
    Not measured at 8-bit.
    """
    if (dense and m == 1 and head_dim is None and not dual and k >= SPLIT_MIN_K
            and k <= DENSE_MAX_RATIO * n and n <= DENSE_MAX_RATIO * k):
        return {"ROWS": 2, "THREADS": 256, "SPLITK": 1, "UNROLL": DEFAULT_UNROLL,
                "MBLOCK": DEFAULT_MBLOCK}
    if k >= n and k >= SPLIT_MIN_K:
        wide = n >= NO_SPLIT_MIN_N and not dual and head_dim is None
        if wide and 4 <= m <= 7:
            rows, split = 8, 0
        elif wide and m == 3 and k < 2 * n:
            rows, split = DEFAULT_ROWS, 0
        elif m == 1 and k < 2 * n and not (dual or dense) and head_dim is None:
            rows, split = SQUARE_ROWS, 0
        else:
            tall = k >= 2 * n and (m == 1 or (wide and m == 3))
            rows, split = (8 if tall else DEFAULT_ROWS), 1
    else:
        rows, split = DEFAULT_ROWS, DEFAULT_SPLITK
    if head_dim is not None:
        if head_dim % rows:
            rows = 2
        return {"ROWS": rows, "THREADS": DEFAULT_THREADS, "SPLITK": split,
                "UNROLL": DEFAULT_UNROLL}
    launch = {"ROWS": rows, "THREADS": DEFAULT_THREADS, "SPLITK": split,
              "UNROLL": DEFAULT_UNROLL, "MBLOCK": _mblock(m, rows, split, dual)}
    bf16 = dtype is not None and dtype == mx.bfloat16  # (Dtype == None raises)
    if m == 1 and not dense and (
            (dual and (rows, split) == (DEFAULT_ROWS, 0))  # measured; R8 S1 lost 1.6-1.8x
            or (bf16 and not dual and rows == 8 and split and k >= 2 * n)):
        launch["MINBLOCKS"] = BOUNDED_MIN_BLOCKS
    return launch


def _mblock(m, rows, split, dual):
    """Rows of ``x`` per SIMD-group for ``m`` rows (``MBLOCK``): they share each weight load.

    From ncu sweeps on an H100 (4-bit, Llama-3-8B shapes, ``m`` = 2 to 16;
    ``docs/ncu_h100_gemv.md`` sections 11 and 13): the dot products stay per row of ``x``
    (the dequantization too), so the gain is in loads and the cost in registers, and a
    block that is not full repeats a row of ``x`` for nothing.

    - Split K: every row of ``x`` in one SIMD-group up to 6 (14336 -> 4096 at ``m`` = 2:
      20.9 against 22.6 us), else 4.
    - The dual gate/up GEMV: 2 when ``m`` is even (4 from 8 when 4 divides it; at
      ``m`` = 4: 67.8 against 78.1 us with 4), an odd ``m`` up to 5 in one block (``m`` =
      3 / 5: 69.6 / 100.2 -> 58.5 / 90.5 us).
    - Eight or more rows without split, from 4 rows of ``x`` (``k >= n``): two blocks,
      half the rows each.
    - Others: every row of ``x`` in one block up to 8 (4096 -> 14336 at ``m`` = 3 / 5 /
      6: 34.1 / 47.3 / 43.5 -> 26.8 / 36.4 / 41.7 us against ``MBLOCK`` 2; 7 was not
      measured), past 8 ``MBLOCK`` 8 or 4 when ``m`` is a multiple of it, else 2.

    Never more than the lanes (``rows * MBLOCK <= 32``) or split K's partial sums allow.
    """
    if m < 2:
        return 1
    if split:
        mb = m if m <= 6 else 4
    elif dual:
        mb = m if m % 2 and m <= 5 else (4 if m >= 8 and m % 4 == 0 else 2)
    elif rows >= 8 and m >= 4:
        mb = -(-m // 2)
    elif m <= 8:
        mb = m
    else:
        mb = 8 if m % 8 == 0 else (4 if m % 4 == 0 else 2)
    mb = min(mb, m, 32 // rows)
    while mb > 1 and not valid_launch({"ROWS": rows, "SPLITK": split, "MBLOCK": mb},
                                      dual=dual):
        mb -= 1
    return mb


def valid_launch(params, *, dual=False):
    """Whether the GEMV stages take these launch constants (``stages.gemv.check_launch``,
    the rules ``gemv_dispatch`` applies; missing ones are the defaults)."""
    try:
        check_launch(params.get("ROWS", DEFAULT_ROWS), params.get("THREADS", DEFAULT_THREADS),
                     params.get("SPLITK", DEFAULT_SPLITK),
                     params.get("MBLOCK", DEFAULT_MBLOCK), dual=dual,
                     unroll=params.get("UNROLL", DEFAULT_UNROLL))
    except ValueError:
        return False
    return True


def _resolve_launch(kern, backend, n, k, m, head_dim, dual, dense=False, dtype=None):
    params = default_launch(n, k, head_dim=head_dim, m=m, dual=dual, dense=dense,
                            dtype=dtype)
    if backend == "reference":
        return params
    try:
        from ..bench.autotune import lookup_linear

        found = lookup_linear(kern, n, k, m, backend)
    except Exception:  # noqa: BLE001 - tuning is an optimisation: never fail a launch
        found = None
    if found and (head_dim is None or head_dim % int(found["ROWS"]) == 0):
        rows, split = int(found["ROWS"]), int(found.get("SPLITK", DEFAULT_SPLITK))
        tuned = {"ROWS": rows, "THREADS": int(found["THREADS"]), "SPLITK": split,
                 "UNROLL": int(found.get("UNROLL", DEFAULT_UNROLL))}
        if head_dim is None:
            # A tuned MBLOCK (a batch shape class) if this launch takes it, else the default.
            # The class rounds m up to a power of two: never more rows than x has.
            mb = min(int(found.get("MBLOCK", 0)), m)
            valid = mb and valid_launch(dict(tuned, MBLOCK=mb), dual=dual)
            tuned["MBLOCK"] = mb if valid else _mblock(m, rows, split, dual)
        if found.get("MINBLOCKS"):  # a tuned launch is what was timed: bounded only if it was
            tuned["MINBLOCKS"] = int(found["MINBLOCKS"])
        if valid_launch(tuned, dual=dual):
            params = tuned
    return params


def _norm_inputs(x, norm_weight, eps):
    """The fused RMSNorm's kernel inputs: ``eps``, and ``norm_weight`` when there is one."""
    args = {"eps": float(eps)}
    if norm_weight is not None:
        args["norm_weight"] = in_dtype_of(norm_weight, x)
    return args


def _epilogue_mlx(y, w, activation, residual, dtype):
    """bias -> activation -> residual with MLX ops (the prefill path)."""
    y = y.astype(mx.float32)
    if w.bias is not None:
        y = y + w.bias.astype(mx.float32)
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual.astype(mx.float32)
    return y.astype(dtype)


# ---- kernels ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def linear_kernel(signature, *, has_bias=False, activation=None, has_residual=False,
                  norm=None):
    """The fused GEMV :class:`CompoundKernel` for one weight format (cached).

    Args:
        signature (tuple): :meth:`Weight.signature` (``("dense",)`` or
            ``("affine", bits, group_size)``); the weight argument is ``w``
            (``w_scales``, ``w_biases``).
        has_bias, has_residual (bool): add the ``bias`` / ``residual`` epilogues.
        activation (str, optional): silu, gelu, gelu_approx or relu.
        norm (str, optional): ``None``, ``"weight"`` (RMSNorm with ``norm_weight``) or
            ``"plain"`` (RMSNorm without weight); the GEMV stage computes ``inv_rms``
            from its own loads of ``x`` and the scale epilogue applies it.

    Call it with keyword arguments: ``x``, ``w`` [, ``w_scales``, ``w_biases``],
    [``bias``], [``residual``], [``norm_weight``, ``eps``]; the launch constants
    ``ROWS``, ``THREADS``, ``SPLITK``, ``MBLOCK`` and ``UNROLL`` may be overridden.
    """
    policy = policy_for(signature, "w")
    decls = gemv_decls(norm=norm)
    main = gemv_stage(policy, decls)
    epilogues = [scale_epilogue()] if norm else []
    if has_bias:
        epilogues.append(bias_epilogue())
    if activation is not None:
        epilogues.append(activation_epilogue(activation))
    if has_residual:
        epilogues.append(residual_epilogue())
    out = Output("out", shape=lambda b: tuple(b.x.shape[:-1]) + (b.w.shape[0],), dtype="x")
    name = "_".join(["norm_linear" if norm else "linear", *map(str, signature)]
                    + (["bias"] if has_bias else []) + ([activation] if activation else [])
                    + (["residual"] if has_residual else []))
    return CompoundKernel(name, main=main, epilogues=epilogues, outputs=[out],
                          dispatch=gemv_dispatch(lambda b: b.w.shape[0]))


@functools.lru_cache(maxsize=None)
def gate_up_kernel(gate_sig, up_sig, *, norm="weight"):
    """Norm + gate/up projections + SwiGLU in one kernel (weights ``wg``, ``wu``)."""
    # A dual GEMV reads both weights chunk by chunk: a dense weight paired with a
    # quantized one uses the quantized chunk (32 elements).
    mixed = (gate_sig[0] == "dense") != (up_sig[0] == "dense")
    pg = policy_for(gate_sig, "wg", chunk=32 if mixed else None)
    pu = policy_for(up_sig, "wu", chunk=32 if mixed else None)
    decls = gemv_decls(norm=norm)
    epilogues = ([scale_epilogue()] if norm else []) + [swiglu_epilogue()]
    if norm:
        # inv_rms scales both projections: acc and acc2.
        epilogues.insert(1, _scale2_epilogue())
    out = Output("out", shape=lambda b: tuple(b.x.shape[:-1]) + (b.wg.shape[0],), dtype="x")
    name = "_".join(["norm_gate_up_swiglu", *map(str, gate_sig), *map(str, up_sig)])
    return CompoundKernel(name, main=gemv_dual_stage(pg, pu, decls),
                          epilogues=epilogues, outputs=[out],
                          dispatch=gemv_dispatch(lambda b: b.wg.shape[0], dual=True))


@functools.lru_cache(maxsize=None)
def _scale2_epilogue():
    from ..stage import Stage
    from ..stages.epilogues import EPILOGUE_INCLUDES, EPILOGUE_SOURCE

    return Stage("scale_inv_rms2", function="ep_scale", source=EPILOGUE_SOURCE,
                 includes=EPILOGUE_INCLUDES, consumes={"inv_rms": "float", "acc2": "float"},
                 produces={"acc2": "float"},
                 reference=lambda b, v: {"acc2": v["acc2"] * v["inv_rms"]})


@functools.lru_cache(maxsize=None)
def qkv_kernel(q_sig, k_sig, v_sig, *, traditional=False, with_weight=True, bias=False,
               joint_kv=False):
    """Norm + Q/K/V projections (+ biases) + RoPE in one kernel (weights ``wq``, ``wk``,
    ``wv``; biases ``q_bias``, ``k_bias``, ``v_bias``); outputs ``q_out``, ``k_out``,
    ``v_out``, or ``q_out``, ``kv_out`` with ``joint_kv``."""
    pq, pk, pv = policy_for(q_sig, "wq"), policy_for(k_sig, "wk"), policy_for(v_sig, "wv")
    decls = gemv_decls(norm="weight" if with_weight else "plain")
    main = qkv_rope_stage(pq, pk, pv, decls, traditional=traditional, bias=bias,
                          joint_kv=joint_kv)
    outs = [a for a in main.args if isinstance(a, Output)]
    name = "_".join(["norm_qkv_rope", *map(str, q_sig), *map(str, k_sig), *map(str, v_sig),
                     "trad" if traditional else "half"] + (["bias"] if bias else [])
                    + (["kv"] if joint_kv else []))
    return CompoundKernel(name, main=main, outputs=outs, manual_output=True,
                          dispatch=gemv_dispatch(lambda b: b.wq.shape[0] + 2 * b.wk.shape[0]))


# ---- public ops ---------------------------------------------------------------------------
def linear(x, weight, scales=None, biases=None, *, group_size=None, bits=None, bias=None,
           activation=None, residual=None, backend=None):
    """``act(x @ W.T + bias) + residual`` in one kernel.

    Dense ``W`` when ``scales`` is ``None``, else MLX's affine layout (the arrays of an
    ``nn.QuantizedLinear``, read as stored). More than :data:`PREFILL_ROWS` rows go to
    MLX's ``quantized_matmul`` / ``matmul``.

    Args:
        x (array): ``[..., K]`` float16, bfloat16 or float32.
        weight (array or Weight): ``[N, K]`` dense, or uint32 ``[N, K*bits/32]``; a
            :class:`Weight` carries its own scales, biases, bias, group size and bits.
        scales, biases (array, optional): ``[N, K/group_size]`` affine scales and biases.
        group_size (int, optional): 32, 64 or 128. Default: ``64`` (with a
            :class:`Weight`: its own; another value is an error).
        bits (int, optional): 2, 3, 4, 5, 6 or 8. Default: ``4`` (with a
            :class:`Weight`: its own; another value is an error).
        bias (array, optional): ``[N]``. Default: ``None``.
        activation (str, optional): ``None``, ``"silu"``, ``"gelu"``, ``"gelu_approx"``
            or ``"relu"``. Default: ``None``.
        residual (array, optional): added last; the output's shape.
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.

    Shape:
        x ``[..., K]`` -> out ``[..., N]`` in ``x``'s dtype.

    Examples:
        >>> w = mx.random.normal((256, 512)).astype(mx.float16)
        >>> wq, s, b = mx.quantize(w, group_size=64, bits=4)
        >>> y = linear(mx.ones((1, 512), mx.float16), wq, s, b, activation="silu")
        >>> y.shape
        (1, 256)
    """
    who = "linear"
    # A repeat call with a Weight takes the launch kept for it (ops/_calls.py).
    key = kept = None
    if (weight.__class__ is Weight and scales is None and biases is None and bias is None
            and group_size is None and bits is None):
        key = _repeat_key(x, weight, activation, residual, backend, who)
        if key is not None:
            kept = _calls.lookup(weight, key)
            if kept is not None and kept not in _calls.STATES:
                return kept(x) if residual is None else kept(x, residual)
            # What this call's launch is made from, taken before anything is resolved.
            arrays, epoch = _calls.arrays_of(weight), launch_epoch()
    if isinstance(weight, Weight):
        if scales is not None or biases is not None or bias is not None:
            raise ValueError(f"[{who}] Pass 'scales', 'biases' and 'bias' inside the Weight, "
                             "not alongside it.")
        # A Weight carries its own format: another one here would be ignored silently.
        for name, val, own in (("group_size", group_size, weight.group_size),
                               ("bits", bits, weight.bits)):
            if val is not None and val != own:
                raise ValueError(f"[{who}] '{name}'={val} differs from the Weight's "
                                 f"{name}={own}; set it in the Weight.")
        w = weight.validate(who)
    else:
        w = Weight.__new__(Weight)
        w.weight, w.scales, w.biases, w.bias = weight, scales, biases, bias
        w.group_size = 64 if group_size is None else group_size
        w.bits = 4 if bits is None else bits
        w.validate(who)
    k = w.in_features
    _check_x(x, k, who)
    if w.quantized and k % w.group_size:
        raise ValueError(f"[{who}] 'group_size' {w.group_size} does not divide K={k}.")
    _check_activation(activation, who)
    out_shape = tuple(x.shape[:-1]) + (w.out_features,)
    _check_residual(residual, out_shape, who)
    be, fused = _fused(backend, x.size // k, who)
    if not fused:
        return _epilogue_mlx(w.matmul(x), w, activation, residual, x.dtype)
    kern = linear_kernel(w.signature(), has_bias=w.bias is not None, activation=activation,
                         has_residual=residual is not None)
    args = dict(w.inputs("w"), x=x)
    if w.bias is not None:
        args["bias"] = w.bias
    if residual is not None:
        args["residual"] = residual
    launch = _launch(kern, w, x, be)
    if key is not None and kept is None:
        _calls.keep(weight, key, arrays, epoch, _calls.SEEN)  # prepared if called again
    elif kept is _calls.SEEN:
        step = kern.prepare(backend=be, vary=("x",) if residual is None else ("x", "residual"),
                            **args, **launch)
        _calls.keep(weight, key, arrays, epoch, step)
        return step(x) if residual is None else step(x, residual)
    return kern(backend=be, **args, **launch)


def _repeat_key(x, w, activation, residual, backend, who):
    """What a call of ``linear`` with the Weight ``w`` launches, as a key of the launches
    kept on ``w`` (``ops/_calls.py``): the backend, ``x``'s and ``residual``'s shapes and
    dtypes, the activation, the weight's format, :data:`PREFILL_ROWS` and
    :data:`MAX_FUSED_ROWS`. ``None`` when the call is not one to keep: the reference
    backend, arguments the full checks must see first (not arrays, an unknown backend),
    or launches being recorded."""
    if (x.__class__ is not mx.array
            or (residual is not None and residual.__class__ is not mx.array)
            or not (activation is None or activation.__class__ is str)
            or (backend is not None and backend not in BACKENDS) or recording()):
        return None
    try:
        be = select_backend(backend, who)  # the environment or the default device may change
    except ValueError:
        return None  # a bad MLX_FOUNDRY_BACKEND: the full path raises it in its order
    if be == "reference":
        return None
    return (be, x.shape, x.dtype, activation,
            None if residual is None else (residual.shape, residual.dtype),
            w.group_size, w.bits, PREFILL_ROWS, MAX_FUSED_ROWS)


def norm_linear(x, norm_weight, eps, weight, *, activation=None, residual=None, backend=None):
    """``act(rms_norm(x, norm_weight, eps) @ W.T + bias) + residual`` in one kernel.

    Computed as ``W (x * norm_weight) * inv_rms`` with ``inv_rms = rsqrt(mean(x^2) + eps)``
    (the norm is never written out).

    Args:
        x (array): ``[..., K]``.
        norm_weight (array, optional): ``[K]`` RMSNorm weight; ``None`` for none.
        eps (float): RMSNorm epsilon (a runtime value: no recompile when it changes).
        weight (Weight): the linear layer (its ``bias`` is added).
        activation (str, optional): silu, gelu, gelu_approx or relu.
        residual (array, optional): added last; the output's shape.
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.

    Shape:
        x ``[..., K]`` -> ``[..., N]``.

    Examples:
        >>> w = Weight.from_module(nn.QuantizedLinear(512, 256, bits=4, group_size=64))
        >>> y = norm_linear(mx.ones((1, 512)), mx.ones((512,)), 1e-5, w)
    """
    who = "norm_linear"
    w = _as_weight(weight, "weight", who)
    k = w.in_features
    _check_x(x, k, who)
    _check_norm(norm_weight, eps, k, who)
    _check_activation(activation, who)
    out_shape = tuple(x.shape[:-1]) + (w.out_features,)
    _check_residual(residual, out_shape, who)
    be, fused = _fused(backend, x.size // k, who)
    if not fused:
        h = mx.fast.rms_norm(x, norm_weight, eps)
        return _epilogue_mlx(w.matmul(h), w, activation, residual, x.dtype)
    kern = linear_kernel(w.signature(), has_bias=w.bias is not None, activation=activation,
                         has_residual=residual is not None,
                         norm="weight" if norm_weight is not None else "plain")
    args = dict(w.inputs("w"), x=x, **_norm_inputs(x, norm_weight, eps))
    if w.bias is not None:
        args["bias"] = w.bias
    if residual is not None:
        args["residual"] = residual
    return kern(backend=be, **args, **_launch(kern, w, x, be))


def norm_gate_up_swiglu(x, norm_weight, eps, gate, up, *, backend=None):
    """``silu(n @ Wg.T) * (n @ Wu.T)`` with ``n = rms_norm(x, norm_weight, eps)``, one kernel.

    The gate and up projections share every load of ``x`` (mlx-lm's MLP up to the down
    projection). Layer biases, if any, are not supported (Llama-family MLPs have none).

    Args:
        x (array): ``[..., K]``.
        norm_weight (array, optional): ``[K]``; ``None`` for an RMSNorm without weight.
        eps (float): RMSNorm epsilon.
        gate, up (Weight): ``[N, K]`` projections (formats may differ).
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.

    Shape:
        x ``[..., K]`` -> ``[..., N]``.
    """
    who = "norm_gate_up_swiglu"
    g = _as_weight(gate, "gate", who)
    u = _as_weight(up, "up", who)
    k = g.in_features
    if (u.in_features, u.out_features) != (k, g.out_features):
        raise ValueError(f"[{who}] 'up' must have the shape of 'gate' (in {k}, out "
                         f"{g.out_features}) but has in {u.in_features}, out {u.out_features}.")
    for name, w_ in (("gate", g), ("up", u)):
        if w_.bias is not None:
            raise ValueError(f"[{who}] '{name}' has a bias, which this op does not support.")
    _check_x(x, k, who)
    _check_norm(norm_weight, eps, k, who)
    be, fused = _fused(backend, x.size // k, who)
    if not fused:
        h = mx.fast.rms_norm(x, norm_weight, eps)
        a = g.matmul(h).astype(mx.float32)
        return (ACTIVATIONS["silu"](a) * u.matmul(h).astype(mx.float32)).astype(x.dtype)
    kern = gate_up_kernel(g.signature(), u.signature(),
                          norm="weight" if norm_weight is not None else "plain")
    args = dict(g.inputs("wg"), **u.inputs("wu"), x=x, **_norm_inputs(x, norm_weight, eps))
    return kern(backend=be, **args, **_launch(kern, g, x, be, dual=True))


def norm_qkv_rope(x, norm_weight, eps, q, k, v, *, n_heads, n_kv_heads, head_dim, offset,
                  rope_base=10000.0, rope_scale=1.0, rope_traditional=False, rope_freqs=None,
                  joint_kv=False, rope=True, backend=None):
    """RMSNorm + Q/K/V projections + RoPE on Q and K, in one kernel.

    ``q = rope(n @ Wq.T)``, ``k = rope(n @ Wk.T)``, ``v = n @ Wv.T`` with
    ``n = rms_norm(x, norm_weight, eps)``; RoPE exactly as
    ``mx.fast.rope(t[B, H, L, D], head_dim, traditional=rope_traditional, base=rope_base,
    scale=rope_scale, offset=offset, freqs=rope_freqs)`` per head, at positions
    ``offset .. offset + L - 1``.

    Args:
        x (array): ``[..., L, K]`` (at least 2-D; ``L`` is the sequence axis).
        norm_weight (array, optional): ``[K]``; ``None`` for an RMSNorm without weight.
        eps (float): RMSNorm epsilon.
        q, k, v (Weight): projections ``[n_heads*head_dim, K]``, ``[n_kv_heads*head_dim, K]``
            (formats may differ; biases, as in Qwen2, are added before RoPE, in the kernel).
        n_heads, n_kv_heads, head_dim (int): grouped-query shapes (``head_dim`` even).
        offset (int or array): position of the first row (a runtime value).
        rope_base (float): Default: ``10000.0``. rope_scale (float): Default: ``1.0``.
        rope_traditional (bool): rotate adjacent pairs. Default: ``False``.
        rope_freqs (array, optional): ``[head_dim/2]`` custom frequencies (Llama 3).
        joint_kv (bool): return keys and values as one array (below). Default: ``False``.
        rope (bool): rotate Q and K. ``False`` gives the three projections of the
            normalised row, still in one kernel, for models that transform Q and K
            further before their RoPE (Qwen3's per-head norms) or whose RoPE this kernel
            does not implement; ``offset`` and the ``rope_*`` arguments are then
            ignored. Default: ``True``.
        backend (str, optional): ``"metal"``, ``"cuda"`` or ``"reference"``.

    Returns:
        (q, k, v): ``[..., L, n_heads*head_dim]``, ``[..., L, n_kv_heads*head_dim]`` twice;
        with ``joint_kv``, ``(q, kv)``: ``kv`` is ``[..., L, 2*n_kv_heads*head_dim]``,
        ``concatenate([k, v], axis=-1)``. For one token (``L == 1``) that is
        ``[B, 2*n_kv_heads, 1, head_dim]`` in memory: keys and values of a cache that
        holds both in one buffer (:class:`mlx_foundry.kv_cache.KVCache`), written
        with one update.
    """
    who = "norm_qkv_rope"
    wq, wk, wv = (_as_weight(w_, n_, who) for w_, n_ in ((q, "q"), (k, "k"), (v, "v")))
    for name, val in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"[{who}] '{name}' must be a positive int but got {val!r}.")
    if head_dim % 2:
        raise ValueError(f"[{who}] 'head_dim' must be even but got {head_dim}.")
    for name, val in (("joint_kv", joint_kv), ("rope", rope)):
        if not isinstance(val, bool):
            raise TypeError(f"[{who}] '{name}' must be a bool but got {type(val).__name__}.")
    if n_heads % n_kv_heads:
        raise ValueError(f"[{who}] 'n_heads' ({n_heads}) must be a multiple of 'n_kv_heads' "
                         f"({n_kv_heads}).")
    kdim = wq.in_features
    for name, w_, n in (("q", wq, n_heads), ("k", wk, n_kv_heads), ("v", wv, n_kv_heads)):
        if w_.out_features != n * head_dim:
            raise ValueError(f"[{who}] '{name}' must have {n * head_dim} output features "
                             f"({n} heads x head_dim {head_dim}) but has {w_.out_features}.")
        if w_.in_features != kdim:
            raise ValueError(f"[{who}] '{name}' must have input dimension K={kdim} (as 'q') but "
                             f"has {w_.in_features}.")
    _check_x(x, kdim, who, min_ndim=2)
    _check_norm(norm_weight, eps, kdim, who)
    if not rope:
        offset, rope_freqs, rope_base, rope_scale, rope_traditional = 0, None, 1.0, 1.0, False
    offset = _rope.check_offset(who, offset)
    _rope.check_rope(who, head_dim, rope_base, rope_freqs, rope_scale, rope_traditional)
    seq = x.shape[-2]
    be, fused = _fused(backend, x.size // kdim, who)
    if not fused:
        q, k, v = _qkv_mlx(x, norm_weight, eps, wq, wk, wv, n_heads, n_kv_heads, head_dim,
                           offset, rope_base, rope_scale, rope_traditional, rope_freqs, rope)
        return (q, mx.concatenate([k, v], axis=-1)) if joint_kv else (q, k, v)
    if rope:
        inv_freq = _rope.inv_freq(head_dim, rope_base, rope_freqs)
    else:
        # Every angle 0: the kernel's rotation is the identity (cos 0 = 1, sin 0 = 0).
        inv_freq = _rope.no_rotation(head_dim)
    has_bias = any(w_.bias is not None for w_ in (wq, wk, wv))
    kern = qkv_kernel(wq.signature(), wk.signature(), wv.signature(),
                      traditional=bool(rope_traditional), with_weight=norm_weight is not None,
                      bias=has_bias, joint_kv=bool(joint_kv))
    args = dict(wq.inputs("wq"), **wk.inputs("wk"), **wv.inputs("wv"), x=x,
                **_norm_inputs(x, norm_weight, eps), rope_inv_freq=inv_freq, seq_len=seq,
                rope_offset=offset, rope_scale=float(rope_scale))
    if has_bias:
        for name, w_ in (("q_bias", wq), ("k_bias", wk), ("v_bias", wv)):
            b = w_.bias if w_.bias is not None else mx.zeros((w_.out_features,), x.dtype)
            args[name] = in_dtype_of(b, x)
    launch = _launch(kern, wq, x, be, n=wq.out_features + 2 * wk.out_features,
                     head_dim=head_dim)
    return kern(backend=be, **args, HEAD_DIM=head_dim, **launch)


def _qkv_mlx(x, norm_weight, eps, wq, wk, wv, n_heads, n_kv_heads, head_dim, offset, base,
             scale, traditional, freqs, rope=True):
    """The unfused path with MLX's own ops (prefill)."""
    h = mx.fast.rms_norm(x, norm_weight, eps)
    lead, seq = tuple(x.shape[:-2]), x.shape[-2]
    outs = []
    for w_, n, rot in ((wq, n_heads, True), (wk, n_kv_heads, True), (wv, n_kv_heads, False)):
        y = w_.matmul(h)
        if w_.bias is not None:
            y = y + w_.bias
        y = y.astype(x.dtype)
        if rot and rope:
            t = y.reshape(-1, seq, n, head_dim).transpose(0, 2, 1, 3)
            t = mx.fast.rope(t, head_dim, traditional=traditional,
                             base=None if freqs is not None else base, scale=scale,
                             offset=offset, freqs=freqs)
            y = t.transpose(0, 2, 1, 3).reshape(lead + (seq, n * head_dim))
        outs.append(y)
    return tuple(outs)
