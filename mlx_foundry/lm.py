"""mlx-lm integration: swap the decode path of transformer blocks for fused ops.

:func:`patch` walks ``model.model.layers`` of an mlx-lm model of a known
architecture (llama, mistral, qwen2, qwen3) and changes the class of every
block it can fuse to a subclass whose ``__call__`` runs, for decode-sized
inputs::

    q, kv   = norm_qkv_rope(x, joint_kv=True)  # input RMSNorm + Q/K/V (+ RoPE)
    k, v    = cache.update_and_fetch_joint(kv) # one write: K and V share a buffer
    o       = scaled_dot_product_attention(q, k, v, cache=cache, mask=mask)
    h       = linear(o, o_proj, residual=x)    # output projection + residual
    a       = norm_gate_up_swiglu(h)           # post-attention RMSNorm + gate/up + SwiGLU
    out     = linear(a, down_proj, residual=h) # down projection + residual

Qwen3 normalises each query and key head before RoPE: its Q/K/V launch leaves RoPE
out (``rope=False``), and one token then runs :func:`mlx_foundry.ops.qk_norm_rope`
(both norms and both RoPEs in one kernel) before the cache; other shapes it cannot take
keep the modules' own norms and RoPE.

One decoded token's keys and values leave the fused kernel as one array and go
into the cache with one update: the patched blocks switch the plain mlx-lm
``KVCache`` objects they decode with to :class:`mlx_foundry.kv_cache.KVCache`, the
same cache with keys and values in one buffer (``patch(model, joint_kv=False)``
keeps mlx-lm's caches as they are; other cache types are never changed).
With ``patch(model, decode_attention=True)`` the attention of a decoded token
runs through :func:`mlx_foundry.ops.decode_attention` over the cache buffer
itself (no key/value views), for contexts up to :data:`DECODE_ATTENTION_MAX_LEN`
and no mask; it is off by default because on MLX's CUDA backend it measured no
faster (see :data:`DECODE_ATTENTION_MAX_LEN`). It concerns the ordinary step: the
compiled step below always attends with it.

On the CUDA backend every decoded token after the first runs through one
``mx.compile``'d function of the whole model instead (:mod:`mlx_foundry.lm_compiled`;
``patch(model, compile_decode=False)`` keeps the ordinary step, ``True`` asks for the
compiled one on any backend): the blocks are traced through this same ``__call__`` with
a :class:`~mlx_foundry.lm_compiled.TracedCache`, so Python builds no graph per token.

The output projection runs through the fused GEMV for decode-sized inputs too:
``lm_head``, or with tied embeddings the embedding's ``as_linear`` (named
:data:`TIED_HEAD` in reports and :func:`patch_stats`).  Every fused op
launches through a prepared launch (:mod:`mlx_foundry.prepared`) built on
first use per input shape, and built again when a module's arrays change.

Blocks (or the attention / MLP half of a block) that cannot be fused keep
their original code, and the :class:`PatchReport` says why.  At call time a
block whose input has more rows than ``max_rows`` (prefill) runs its
original code, which MLX already runs as a GEMM.  :func:`unpatch` restores
the original classes.

The weights are never copied: the fused ops read ``nn.Linear`` and MLX
affine ``nn.QuantizedLinear`` weights where they are.
"""

import functools
import operator
from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .lm_compiled import _RUNNER_ATTR, TracedCache, traced_block

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# The mlx-lm modules whose TransformerBlock.__call__ we reproduce exactly.
_KNOWN_BLOCK_MODULES = {
    "mlx_lm.models.llama": "llama",
    "mlx_lm.models.qwen2": "qwen2",
    "mlx_lm.models.qwen3": "qwen3",
}

_PLAN_ATTR = "_mlx_foundry_plan"
_REPORT_ATTR = "_mlx_foundry_report"
_DEFAULT_MAX_ROWS = 16

DECODE_ATTENTION_MAX_LEN = 1024
"""Cached positions up to which a block patched with ``decode_attention=True`` attends
through :func:`mlx_foundry.ops.decode_attention`: its one-pass kernel, one prepared
launch (longer contexts take MLX's attention, as unpatched; the op's own long-context
path is two launches).

Measured with ncu on an NVIDIA H100 (MLX 0.32.4, 32/8 heads x 128, float16): the kernel
takes 7.2 / 22.0 us at 151 / 1001 positions against 8.2 / 23.6 us for MLX's one-pass
attention. The decode of a whole token was not faster with it (`tools/decode_breakdown.py`,
pipelined per token: 3.71 against 3.71 ms on a host-bound lease, 2.86 against 2.66 ms
with an earlier version on another): the launch of a custom kernel costs the host about
what MLX's attention and the two key/value views cost. docs/bench_journal.md has the table."""

__all__ = ["PatchReport", "patch", "unpatch", "is_patched", "patch_stats",
           "SUPPORTED_MODEL_TYPES"]


# ------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------
@dataclass
class PatchReport:
    """What :func:`patch` fused and what it left as it was, and why.

    Attributes:
        model_type (str): the model's ``model_type`` (``"?"`` if it has none).
        backend (str): the backend the fused ops use (``"auto"``: chosen per call).
        fused (list of (str, str)): (module path, what was fused).
        skipped (list of (str, str)): (module path, reason it was left as it was).
        max_rows (int): blocks with more input rows (batch x tokens) run their
            original code.
        compiled_decode (bool): decoded tokens after the first run through the
            compiled step (``patch(..., compile_decode=...)``).
    """

    model_type: str = "?"
    backend: str = "auto"
    fused: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    max_rows: int = _DEFAULT_MAX_ROWS
    blocks: int = 0
    compiled_decode: bool = False

    @property
    def patched_blocks(self):
        """Paths of the blocks that run at least one fused half."""
        seen = []
        for path, _ in self.fused:
            if path in ("lm_head", TIED_HEAD, "model"):
                continue
            block = path.rsplit(".", 1)[0] if path.endswith((".self_attn", ".mlp")) else path
            if block not in seen:
                seen.append(block)
        return seen

    def __bool__(self):
        return bool(self.fused)

    def __str__(self):
        n = len(self.patched_blocks)
        lines = [f"mlx_foundry.patch: model_type={self.model_type}, backend={self.backend}, "
                 f"{n} of {self.blocks} blocks fused (inputs over {self.max_rows} rows run "
                 "the original code)"]
        if self.fused:
            lines.append("  fused:")
            width = max(len(p) for p, _ in self.fused)
            lines += [f"    {p:<{width}}  {w}" for p, w in self.fused]
        if self.skipped:
            lines.append("  left as it was:")
            width = max(len(p) for p, _ in self.skipped)
            lines += [f"    {p:<{width}}  {r}" for p, r in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------
@functools.cache
def _ops():
    """``mlx_foundry.ops``, imported on first use (it imports this module's users)."""
    from . import ops

    return ops


def _weight_problem(m):
    """Why the fused ops cannot read linear module ``m`` (``None`` if they can)."""
    # A module patch() subclassed (a fused lm_head) is judged as its original class.
    cls = getattr(type(m), "_mlx_foundry_original", type(m))
    name = cls.__name__
    if cls is nn.QuantizedLinear or cls is nn.QuantizedEmbedding:
        mode = getattr(m, "mode", "affine")
        if mode != "affine":
            return f"quantization mode {mode!r} is not supported (affine only)"
    elif cls is not nn.Linear and cls is not nn.Embedding:
        if "lora" in name.lower() or "dora" in name.lower():
            return f"adapter layer {name} (LoRA/DoRA) is not fused"
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            return f"{name} subclasses an MLX linear layer and may compute something else"
        return f"{name} is not nn.Linear / nn.QuantizedLinear"
    try:
        _to_weight(m)   # bits, group size, shapes and dtypes the fused ops accept
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _weight_summary(m):
    if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return f"affine {m.bits}-bit g{m.group_size}"
    return f"dense {str(m.weight.dtype).split('.')[-1]}"


def _to_weight(m):
    return _ops().Weight.from_module(m)


class _WeightCache:
    """``Weight`` views of linear modules, rebuilt when a module or its arrays change.

    An identity check on the module and its arrays (weight, scales, biases, bias)
    keeps a view correct after ``load_weights``, ``nn.quantize`` or an adapter
    replacing the module; a module the fused ops cannot read gives ``None``.
    """

    __slots__ = ("_entries",)
    _ARRAYS = ("weight", "scales", "biases", "bias")

    def __init__(self):
        self._entries = {}

    def get(self, key, m):
        arrays = tuple(m.get(k) for k in self._ARRAYS) if isinstance(m, nn.Module) else ()
        e = self._entries.get(key)
        if (e is not None and e[0] is m and len(e[1]) == len(arrays)
                and all(a is b for a, b in zip(e[1], arrays))):
            return e[2]
        view = None
        if _weight_problem(m) is None:
            try:
                view = _to_weight(m)
            except (ValueError, TypeError):
                view = None
        self._entries[key] = (m, arrays, view)
        return view


# ------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------
def _rope_spec(rope, head_dim):
    """``(kwargs for norm_qkv_rope, None)`` or ``(None, reason)`` for a RoPE module."""
    name = type(rope).__name__
    dims = getattr(rope, "dims", None)
    if dims != head_dim:
        return None, f"RoPE {name} rotates {dims} of {head_dim} dims (partial rotary)"
    if type(rope) is nn.RoPE:
        return {"rope_base": float(rope.base), "rope_scale": float(rope.scale),
                "rope_traditional": bool(rope.traditional), "rope_freqs": None}, None
    if name == "Llama3RoPE" and type(rope).__module__ == "mlx_lm.models.rope_utils":
        # mx.fast.rope(x, dims, base=None, scale=1.0, freqs=rope._freqs)
        return {"rope_scale": 1.0, "rope_traditional": bool(rope.traditional),
                "rope_freqs": "_freqs"}, None
    return None, f"RoPE class {name} is not known to the fused op"


# ------------------------------------------------------------------------------------
# Plan of one block
# ------------------------------------------------------------------------------------
class _BlockPlan:
    """What a patched block fuses, and counters of how its calls ran."""

    def __init__(self, path, original_class, arch, attn, mlp, rope, head_dim, backend,
                 max_rows, joint_kv=True, decode_attention=False):
        self.path = path
        self.original_class = original_class
        self.arch = arch
        self.attn = attn          # None, "qkv_rope", "qkv_norm_rope" or "qkv"
        self.mlp = mlp            # bool
        self.rope = rope          # RoPE kwargs of norm_qkv_rope / qk_norm_rope (or None)
        self.head_dim = head_dim
        self.backend = backend
        self.max_rows = max_rows
        self.joint_kv = joint_kv  # switch plain mlx-lm KVCaches to the joint-buffer cache
        self.decode_attention = joint_kv and decode_attention  # ops.decode_attention
        self.weights = _WeightCache()
        self.stats = Counter()
        self.steps = {}           # (x.shape, x.dtype, int offset) -> _Step
        self.fast_calls = 0       # calls that took _Step.fast (counted as fused, both halves)
        self.watch = None         # what the prepared launches captured (see _watch_list)

    def describe(self):
        parts = []
        if self.attn:
            parts.append(self.attn)
        if self.mlp:
            parts.append("mlp")
        return "+".join(parts)


def _check_structure(block):
    """Why ``block`` is not a llama-family block we can reproduce (or ``None``)."""
    mod = type(block).__module__
    if mod not in _KNOWN_BLOCK_MODULES or type(block).__name__ != "TransformerBlock":
        return f"block class {mod}.{type(block).__name__} is not a known transformer block"
    for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        if not hasattr(block, name):
            return f"block has no {name}"
    for name in ("input_layernorm", "post_attention_layernorm"):
        if type(getattr(block, name)) is not nn.RMSNorm:
            return f"{name} is {type(getattr(block, name)).__name__}, not nn.RMSNorm"
    return None


def _plan_attention(block, path, arch):
    """``(mode, rope_spec, head_dim, what, reasons)`` for the attention half."""
    attn = block.self_attn
    apath = f"{path}.self_attn"
    reasons = []
    if type(attn).__module__ != type(block).__module__ or type(attn).__name__ != "Attention":
        return None, None, None, None, [(apath, f"attention class {type(attn).__name__} "
                                                "is not known")]
    projs = ("q_proj", "k_proj", "v_proj", "o_proj")
    for p in projs:
        m = getattr(attn, p, None)
        why = "missing" if m is None else _weight_problem(m)
        if why:
            reasons.append((f"{apath}.{p}", why))
    if reasons:
        return None, None, None, None, reasons
    n_heads, n_kv = attn.n_heads, attn.n_kv_heads
    out_q = attn.q_proj.weight.shape[0]
    if out_q % n_heads:
        return None, None, None, None, [(apath, f"q_proj outputs {out_q} features, not a "
                                                f"multiple of {n_heads} heads")]
    head_dim = out_q // n_heads
    for p in ("k_proj", "v_proj"):
        out = getattr(attn, p).weight.shape[0]
        if out != n_kv * head_dim:
            return None, None, None, None, [(f"{apath}.{p}", f"outputs {out} features, not "
                                                             f"{n_kv} KV heads x {head_dim}")]
    if head_dim % 2:
        return None, None, None, None, [(apath, f"head_dim {head_dim} is odd")]
    qk_norm = hasattr(attn, "q_norm") or hasattr(attn, "k_norm")
    if qk_norm and not (type(getattr(attn, "q_norm", None)) is nn.RMSNorm
                        and type(getattr(attn, "k_norm", None)) is nn.RMSNorm):
        return None, None, None, None, [(apath, "q/k norms are not nn.RMSNorm")]
    rope, why = _rope_spec(attn.rope, head_dim)
    wsum = _weight_summary(attn.q_proj)
    qkv_bias = any("bias" in getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj"))
    if rope is not None and not qk_norm:
        # Projection biases (Qwen2) are added in the kernel, before RoPE.
        bias = " (+ q/k/v biases)" if qkv_bias else ""
        what = f"attention: rms_norm+q/k/v{bias}+rope ({wsum}), sdpa, o_proj+residual"
        return "qkv_rope", rope, head_dim, what, []
    if qk_norm:
        why_not = _qk_norm_rope_problem(attn, rope, head_dim) if rope is not None else why
        if why_not is None:
            # Qwen3: one token's Q/K/V (one launch, K and V joint), then its q/k norms and
            # RoPE (another) when the cache is the joint one; else the modules' own.
            what = (f"attention: rms_norm+q/k/v ({wsum}), q/k norms+rope, sdpa, "
                    "o_proj+residual")
            return "qkv_norm_rope", rope, head_dim, what, []
        note = f"q/k norms sit between projection and RoPE ({why_not})"
    else:
        note = why
        reasons.append((f"{apath}.rope", f"RoPE left unfused: {why}"))
    what = (f"attention: rms_norm+q/k/v ({wsum}; {note}: module RoPE), sdpa, "
            "o_proj+residual")
    return "qkv", None, head_dim, what, reasons


def _qk_norm_rope_problem(attn, rope, head_dim):
    """Why ``ops.qk_norm_rope`` cannot take this attention's q/k norms and RoPE."""
    from .ops.qk_norm import MAX_HEAD_DIM

    if head_dim % 32 or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not a multiple of 32 up to {MAX_HEAD_DIM}"
    if rope.get("rope_traditional") and head_dim % 64:
        return f"traditional RoPE over head_dim {head_dim} (not a multiple of 64)"
    if attn.q_norm.eps != attn.k_norm.eps:
        return "the q and k norms have different eps"
    return None


def _plan_mlp(block, path):
    mlp = block.mlp
    mpath = f"{path}.mlp"
    if type(mlp).__module__ != type(block).__module__ or type(mlp).__name__ != "MLP":
        return None, [(mpath, f"MLP class {type(mlp).__name__} is not known")]
    reasons = []
    for p in ("gate_proj", "up_proj", "down_proj"):
        m = getattr(mlp, p, None)
        why = "missing" if m is None else _weight_problem(m)
        if why:
            reasons.append((f"{mpath}.{p}", why))
    if reasons:
        return None, reasons
    for p in ("gate_proj", "up_proj"):
        if "bias" in getattr(mlp, p):
            return None, [(f"{mpath}.{p}", "has a bias, which norm_gate_up_swiglu does not "
                                           "support")]
    return (f"mlp: rms_norm+gate/up+swiglu ({_weight_summary(mlp.gate_proj)}), "
            "down_proj+residual"), []


# ------------------------------------------------------------------------------------
# The patched block
# ------------------------------------------------------------------------------------
_SDPA = []


def _sdpa():
    """mlx-lm's ``scaled_dot_product_attention`` (quantized caches, masks), imported once."""
    if not _SDPA:
        from mlx_lm.models.base import scaled_dot_product_attention
        _SDPA.append(scaled_dot_product_attention)
    return _SDPA[0]


_WHOLE_QKV = ("qkv_rope", "qkv_norm_rope")
"""Attention modes whose decoded token's Q/K/V reach the attention in prepared launches
(RoPE included)."""


class _Step:
    """The prepared launches of one block for one input shape and dtype.

    Each slot is ``None`` until its first use, then a
    :class:`~mlx_foundry.prepared.PreparedLaunch`, or ``False`` when that op
    cannot be prepared (it then runs through its op function every call).
    """

    __slots__ = ("qkv", "qkv_joint", "qkv_plain", "o", "gate_up", "down", "attend", "fast")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, None)

    def arm(self, plan, block, offset, batch):
        """Set :attr:`fast` when one token's whole block runs on the four prepared
        launches (Q/K/V+RoPE, o_proj+residual, gate/up, down+residual); the Q/K/V launch
        with keys and values in one output, the other, or both. The output projection
        takes the attention output as it comes, ``[batch, heads, 1, head_dim]``."""
        if (plan.attn in _WHOLE_QKV and plan.mlp and offset.__class__ is int
                and (self.qkv or self.qkv_joint) and self.o and self.gate_up and self.down):
            attn = block.self_attn
            o_proj = self.o.reshaped_inputs(x=(batch, attn.n_heads, 1, plan.head_dim))
            self.fast = (self.qkv, self.qkv_joint, o_proj, self.gate_up, self.down, _sdpa(),
                         attn)


@functools.cache
def _joint_cache():
    """``(mlx_foundry.kv_cache.KVCache, adopt)``, imported once (needs mlx-lm)."""
    from .kv_cache import KVCache, adopt

    return KVCache, adopt


def _joint(plan, cache):
    """Whether ``cache`` takes one token's keys and values as one array (switching a
    plain mlx-lm ``KVCache`` to the joint-buffer cache when the plan allows it)."""
    if not plan.joint_kv or cache is None:
        return False
    joint_cls, adopt = _joint_cache()
    return cache.__class__ is joint_cls or adopt(cache)


def _attends(plan, mask, offset):
    """Whether one token's attention runs through :func:`~mlx_foundry.ops.decode_attention`
    over the joint cache (no mask: every cached position is visible)."""
    return (plan.decode_attention and offset < DECODE_ATTENTION_MAX_LEN
            and (mask is None or (mask.__class__ is str and mask == "causal")))


def _attend(plan, step, q, kv, cache, scale):
    """Append the token's keys and values to the joint cache and attend over it: ``[B, H,
    1, D]``. The launch is prepared per cache capacity (the buffer grows in steps)."""
    past, past_len = cache.append_joint(kv)  # the buffer after the write
    slot = step.attend
    cap = past.shape[2]
    if slot is None or (slot and slot[0] != cap):
        launch = _prepare(_ops().decode_attention, q, kv, past, past_len=past_len, scale=scale,
                          vary={"q": q, "kv": kv, "past": past, "past_len": past_len},
                          backend=plan.backend)
        slot = step.attend = (cap, launch) if launch else False
    if slot:
        return slot[1](q, kv, past, past_len)
    return _ops().decode_attention(q, kv, past, past_len=past_len, scale=scale,
                                   backend=plan.backend)


def _prepare(op, *args, vary, backend, **kwargs):
    from .prepared import prepare_op

    return prepare_op(op, *args, vary=vary, backend=backend, **kwargs) or False


def _watcher():
    """``(item, done)``: ``item(container, key)`` records what a dict (a module) holds
    under ``key`` and returns it; ``done()`` gives the record as three parallel tuples."""
    containers, keys, values = [], [], []

    def item(container, key):
        if not isinstance(container, dict):
            return None
        value = dict.get(container, key)
        containers.append(container)
        keys.append(key)
        values.append(value)
        return value

    return item, lambda: (tuple(containers), tuple(keys), tuple(values))


def _watch_list(block):
    """What the prepared launches captured: ``(containers, keys, objects)``.

    A block whose modules, arrays or epsilons were replaced after the launches
    were prepared (``load_weights``, ``nn.quantize``, an adapter) no longer
    matches, and its launches are prepared again.  Three parallel tuples, so that
    the check of every call (:func:`_watch_holds`) is one pass in C.
    """
    item, done = _watcher()
    attn, mlp = item(block, "self_attn"), item(block, "mlp")
    for name in ("input_layernorm", "post_attention_layernorm"):
        ln = item(block, name)
        if isinstance(ln, nn.Module):
            item(ln, "weight")
            item(ln.__dict__, "eps")
    for parent, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "q_norm",
                                  "k_norm")),
                          (mlp, ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            m = item(parent, name)
            if isinstance(m, nn.Module):
                if name == "rope":
                    item(m, "_freqs")
                elif name.endswith("_norm"):
                    item(m, "weight")
                    item(m.__dict__, "eps")
                else:
                    for key in ("weight", "scales", "biases", "bias"):
                        item(m, key)
    return done()


def _top_watch_list(model):
    """What a compiled decode step captured besides the blocks (the embedding, the
    final norm, the output projection), in the form of :func:`_watch_list`."""
    item, done = _watcher()
    inner = item(model, "model")
    if isinstance(inner, nn.Module):
        for name, keys in (("embed_tokens", ("weight", "scales", "biases")),
                           ("norm", ("weight",))):
            m = item(inner, name)
            if isinstance(m, nn.Module):
                for key in keys:
                    item(m, key)
                item(m.__dict__, "eps")
    head = item(model, "lm_head")
    if isinstance(head, nn.Module):
        for key in ("weight", "scales", "biases", "bias"):
            item(head, key)
    return done()


def _watch_holds(watch, _get=dict.get, _is=operator.is_):
    """Whether every watched entry still holds the object it held when prepared."""
    containers, keys, values = watch
    return all(map(_is, map(_get, containers, keys), values))


def _step(plan, block, x, offset):
    """The block's :class:`_Step` for this input (prepared again after weight changes)."""
    watch = plan.watch
    if watch is None or not _watch_holds(watch):
        plan.steps.clear()
        plan.watch = _watch_list(block)
    key = (x.shape, x.dtype, offset.__class__ is int)
    step = plan.steps.get(key)
    if step is None:
        if len(plan.steps) >= 64:  # many batch/length shapes: keep the newest
            plan.steps.clear()
        step = plan.steps[key] = _Step()
    return step


def _rope_kwargs(plan, attn):
    """The plan's RoPE keyword arguments, with the module's own frequencies (Llama 3)."""
    rope = dict(plan.rope)
    if rope.get("rope_freqs") == "_freqs":
        rope["rope_freqs"] = attn.rope._freqs
    return rope


def _qkv_rope_args(self, plan, x, rope=True):
    """Positional and keyword arguments of ``norm_qkv_rope`` after ``x`` (or ``None``);
    with ``rope=False`` those of the projections without RoPE."""
    attn, ln = self.self_attn, self.input_layernorm
    ws = plan.weights
    wq, wk, wv = (ws.get(p, getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj"))
    if wq is None or wk is None or wv is None:
        return None
    rope = _rope_kwargs(plan, attn) if rope else {"rope": False}
    return (ln.weight, ln.eps, wq, wk, wv), dict(n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads,
                                                 head_dim=plan.head_dim, **rope)


def _fused_attention(self, plan, step, x, mask, cache, offset):
    ops = _ops()
    attn = self.self_attn
    B, L, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, plan.head_dim
    be = plan.backend
    joint = False  # one token's keys and values as one array, for the joint cache
    if plan.attn == "qkv_rope" and offset.__class__ is int:
        joint = L == 1 and _joint(plan, cache)
        slot = "qkv_joint" if joint else "qkv"
        launch = getattr(step, slot)
        if not launch:
            found = _qkv_rope_args(self, plan, x)
            if found is None:
                return None
            args, kw = found
            if launch is None:
                launch = _prepare(ops.norm_qkv_rope, x, *args, offset=offset, joint_kv=joint,
                                  vary={"x": x, "rope_offset": offset}, backend=be, **kw)
                if launch and L == 1:
                    # One token: [B, 1, H*D] is [B, H, 1, D] in memory; declaring the
                    # attention layout in the launch saves six graph nodes per block.
                    kv_shapes = ((B, 2 * KV, 1, D),) if joint else ((B, KV, 1, D),) * 2
                    launch = launch.reshaped((B, H, 1, D), *kv_shapes)
                setattr(step, slot, launch)
        if launch:
            outs = launch(x, offset)
        else:
            outs = ops.norm_qkv_rope(x, *args, offset=offset, joint_kv=joint, backend=be, **kw)
        if not (launch and L == 1):  # else the launch is already in the attention layout
            outs = [t.reshape(B, L, -1, D).transpose(0, 2, 1, 3) for t in outs]
        if joint:
            q, kv = outs
        else:
            q, k, v = outs
    elif (plan.attn == "qkv_norm_rope" and L == 1 and offset.__class__ is int
          and _joint(plan, cache) and _qk_norm_launch(self, plan, step, x, offset)):
        joint = True
        q, kv = step.qkv_joint(x, offset)
    else:
        # Q/K/V in one launch without RoPE; the model's own q/k norms (Qwen3) and RoPE
        # module follow.
        launch = step.qkv_plain
        if launch:
            q, k, v = launch(x)
        else:
            found = _qkv_rope_args(self, plan, x, rope=False)
            if found is None:
                return None
            args, kw = found
            if launch is None:
                launch = step.qkv_plain = _prepare(ops.norm_qkv_rope, x, *args, offset=0,
                                                   vary={"x": x}, backend=be, **kw)
            q, k, v = (launch(x) if launch
                       else ops.norm_qkv_rope(x, *args, offset=0, backend=be, **kw))
        q = q.reshape(B, L, H, D)
        k = k.reshape(B, L, KV, D)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        q = q.transpose(0, 2, 1, 3)
        k = k.transpose(0, 2, 1, 3)
        v = v.reshape(B, L, KV, D).transpose(0, 2, 1, 3)
        if cache is not None:
            q = attn.rope(q, offset=offset)
            k = attn.rope(k, offset=offset)
        else:
            q = attn.rope(q)
            k = attn.rope(k)
    if joint:
        if _attends(plan, mask, offset):
            o = _attend(plan, step, q, kv, cache, attn.scale)
            return _linear_residual(plan, step, "o", "o_proj", attn, o.reshape(B, L, -1), x)
        k, v = cache.update_and_fetch_joint(kv)
    elif cache is not None:
        k, v = cache.update_and_fetch(k, v)
    o = _sdpa()(q, k, v, cache=cache, scale=attn.scale, mask=mask)
    # [B, H, L, D] -> [B, L, H*D]; with one token the transpose moves nothing.
    o = o.reshape(B, L, -1) if L == 1 else o.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return _linear_residual(plan, step, "o", "o_proj", attn, o, x)


class _QKNormRope:
    """One token's Q/K/V without RoPE (a prepared launch, keys and values joint), then its
    q/k norms and RoPE (another): called as a block's joint Q/K/V launch is,
    ``(x, offset) -> (q, kv)`` in the attention layouts."""

    __slots__ = ("qkv", "norm")

    def __init__(self, qkv, norm):
        self.qkv, self.norm = qkv, norm

    def __call__(self, x, offset):
        q, kv = self.qkv(x)
        return self.norm(q, kv, offset)


def _qk_norm_launch(self, plan, step, x, offset):
    """The :class:`_QKNormRope` of ``step`` (prepared on first use; ``False`` when it
    cannot be prepared)."""
    launch = step.qkv_joint
    if launch is not None:
        return launch
    found = _qkv_rope_args(self, plan, x, rope=False)
    if found is None:
        return False
    ops = _ops()
    attn = self.self_attn
    B, D = x.shape[0], plan.head_dim
    args, kw = found
    qkv = _prepare(ops.norm_qkv_rope, x, *args, offset=0, joint_kv=True, vary={"x": x},
                   backend=plan.backend, **kw)
    norm = False
    if qkv:
        # One token: [B, 1, H*D] is [B, H, 1, D] in memory (see the Llama path).
        q = mx.zeros((B, attn.n_heads, 1, D), x.dtype)
        kv = mx.zeros((B, 2 * attn.n_kv_heads, 1, D), x.dtype)
        qkv = qkv.reshaped(q.shape, kv.shape)
        norm = _prepare(ops.qk_norm_rope, q, kv, attn.q_norm.weight, attn.k_norm.weight,
                        attn.q_norm.eps, offset=offset,
                        vary={"q": q, "kv": kv, "rope_offset": offset}, backend=plan.backend,
                        **_rope_kwargs(plan, attn))
    step.qkv_joint = _QKNormRope(qkv, norm) if qkv and norm else False
    return step.qkv_joint


def _linear_residual(plan, step, slot, name, parent, a, residual):
    """``residual + a @ W.T`` for the projection ``name`` of ``parent`` through the step's
    prepared launch in ``slot`` (prepared on first use); ``None`` when it cannot be fused."""
    launch = getattr(step, slot)
    if launch:
        return launch(a, residual)
    w = plan.weights.get(name, getattr(parent, name))
    if w is None:
        return None
    ops = _ops()
    if launch is None:
        launch = _prepare(ops.linear, a, w, residual=residual,
                          vary={"x": a, "residual": residual}, backend=plan.backend)
        setattr(step, slot, launch)
        if launch:
            return launch(a, residual)
    return ops.linear(a, w, residual=residual, backend=plan.backend)


def _fused_mlp(self, plan, step, h):
    ops = _ops()
    be = plan.backend
    launch = step.gate_up
    if launch:
        a = launch(h)
    else:
        mlp, ln = self.mlp, self.post_attention_layernorm
        wg, wu = (plan.weights.get(p, getattr(mlp, p)) for p in ("gate_proj", "up_proj"))
        if wg is None or wu is None:
            return None
        if launch is None:
            launch = step.gate_up = _prepare(ops.norm_gate_up_swiglu, h, ln.weight, ln.eps,
                                             wg, wu, vary={"x": h}, backend=be)
        a = (launch(h) if launch
             else ops.norm_gate_up_swiglu(h, ln.weight, ln.eps, wg, wu, backend=be))
    return _linear_residual(plan, step, "down", "down_proj", self.mlp, a, h)


def _patched_call(self, x, mask=None, cache=None):
    plan = self.__dict__.get(_PLAN_ATTR)
    original = type(self)._mlx_foundry_original
    if plan is None or x.ndim != 3:
        return original.__call__(self, x, mask, cache)
    shape = x.shape
    if shape[0] * shape[1] > plan.max_rows:
        plan.stats["original: rows > max_rows"] += 1
        return original.__call__(self, x, mask, cache)
    if cache.__class__ is TracedCache:  # tracing the compiled decode step
        return traced_block(self, plan, x, cache)
    offset = 0 if cache is None else cache.offset
    step = _step(plan, self, x, offset)
    fast = step.fast
    if fast is not None and cache is not None:
        # One decoded token on the prepared launches: the host work of the decode loop
        # (graph building, then MLX's encoding of every node) is what limits tokens/s
        # once the kernels are fused, so this path does nothing the launches don't need.
        qkv, qkv_joint, o_proj, gate_up, down, sdpa, attn = fast
        joint = _joint(plan, cache)
        if qkv_joint if joint else qkv:
            plan.fast_calls += 1
            if joint:
                q, kv = qkv_joint(x, offset)
                if _attends(plan, mask, offset):
                    h = o_proj(_attend(plan, step, q, kv, cache, attn.scale), x)
                    return down(gate_up(h), h)
                k, v = cache.update_and_fetch_joint(kv)
            else:
                q, k, v = qkv(x, offset)
                k, v = cache.update_and_fetch(k, v)
            o = sdpa(q, k, v, cache=cache, scale=attn.scale, mask=mask)
            h = o_proj(o, x)
            return down(gate_up(h), h)
        # The other kind of cache: its Q/K/V launch is prepared on the general path.
    h = None
    if plan.attn:
        h = _fused_attention(self, plan, step, x, mask, cache, offset)
        plan.stats["fused attention" if h is not None else "original attention: weights"] += 1
    if h is None:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
    out = None
    if plan.mlp:
        out = _fused_mlp(self, plan, step, h)
        plan.stats["fused mlp" if out is not None else "original mlp: weights"] += 1
    if out is None:
        out = h + self.mlp(self.post_attention_layernorm(h))
    elif shape[1] == 1 and cache is not None and (
            fast is None or fast[0] is not step.qkv or fast[1] is not step.qkv_joint):
        step.arm(plan, self, offset, shape[0])  # first token, or another cache's Q/K/V
    return out


def _patched_extra_repr(self):
    plan = self.__dict__.get(_PLAN_ATTR)
    base = type(self)._mlx_foundry_original._extra_repr(self)
    note = f"mlx_foundry: fused {plan.describe()}" if plan else "mlx_foundry"
    return f"{base}, {note}" if base else note


_SUBCLASSES = {}


def _fused_subclass(cls, namespace, doc):
    """The subclass of ``cls`` whose methods ``namespace`` replaces (one per class and
    set of methods)."""
    key = (cls, frozenset(namespace.items()))
    sub = _SUBCLASSES.get(key)
    if sub is None:
        sub = type(f"Fused{cls.__name__}", (cls,), dict(
            namespace, _mlx_foundry_original=cls, __module__=__name__,
            __doc__=f"{cls.__name__} {doc}"))
        _SUBCLASSES[key] = sub
    return sub


def _patched_class(cls):
    return _fused_subclass(cls, {"__call__": _patched_call, "_extra_repr": _patched_extra_repr},
                           "with its decode path fused by mlx_foundry.patch.")


# ------------------------------------------------------------------------------------
# The output projection: lm_head, or the embedding's as_linear when the embeddings are tied
# ------------------------------------------------------------------------------------
_HEAD_ATTR = "_mlx_foundry_head"

TIED_HEAD = "model.embed_tokens.as_linear"
"""The path under which :class:`PatchReport` and :func:`patch_stats` name the output
projection of a model with tied embeddings."""


class _HeadPlan:
    """A patched output projection: its prepared launches per input shape, and call
    counters."""

    def __init__(self, path, backend, max_rows):
        self.path = path
        self.backend = backend
        self.max_rows = max_rows
        self.weights = _WeightCache()
        self.weight = None        # the Weight view the launches were prepared with
        self.launches = {}        # (x.shape, x.dtype) -> PreparedLaunch or False
        self.stats = Counter()


def _head_gemv(self, x, original):
    """The output projection of ``x``: the fused GEMV for decode-sized inputs, else
    ``original(self, x)`` (the module's own method)."""
    plan = self.__dict__.get(_HEAD_ATTR)
    if plan is None or x.ndim < 2 or x.size // x.shape[-1] > plan.max_rows:
        return original(self, x)
    w = plan.weights.get(plan.path, self)  # a new view when the module's arrays change
    if w is not plan.weight:
        plan.launches.clear()
        plan.weight = w
    key = (x.shape, x.dtype)
    launch = plan.launches.get(key)
    if launch is None:
        launch = plan.launches[key] = w is not None and _prepare(
            _ops().linear, x, w, vary={"x": x}, backend=plan.backend)
    if not launch:
        plan.stats["original"] += 1
        return original(self, x)
    plan.stats["fused"] += 1
    return launch(x)


def _head_call(self, x):
    return _head_gemv(self, x, type(self)._mlx_foundry_original.__call__)


def _tied_head_as_linear(self, x):
    return _head_gemv(self, x, type(self)._mlx_foundry_original.as_linear)


_HEAD_METHODS = {"__call__": _head_call, "as_linear": _tied_head_as_linear}


def _head(model):
    """``(path, module, method)`` of the output projection: ``model.lm_head`` and its
    ``__call__``; with tied embeddings (no ``lm_head`` in the supported mlx-lm models)
    ``model.model.embed_tokens`` and its ``as_linear``, which the model calls on the
    last hidden states. ``(None, None, None)`` when there is neither."""
    if not isinstance(model, dict):
        return None, None, None
    head = dict.get(model, "lm_head")
    if head is not None:
        return "lm_head", head, "__call__"
    inner = dict.get(model, "model")
    emb = dict.get(inner, "embed_tokens") if isinstance(inner, dict) else None
    if isinstance(emb, nn.Module) and callable(getattr(emb, "as_linear", None)):
        return TIED_HEAD, emb, "as_linear"
    return None, None, None


def _head_plan(model):
    """The :class:`_HeadPlan` of a patched output projection, or ``None``."""
    head = _head(model)[1]
    return head.__dict__.get(_HEAD_ATTR) if isinstance(head, nn.Module) else None


def _patch_head(model, report, backend, max_rows):
    """Fuse the output projection (``lm_head``, or the tied embedding's ``as_linear``)
    when the GEMV can read its weights."""
    path, head, method = _head(model)
    if head is None:
        return
    why = _weight_problem(head) if isinstance(head, nn.Module) else "not a module"
    if why:
        report.skipped.append((path, why))
        return
    object.__setattr__(head, _HEAD_ATTR, _HeadPlan(path, backend, max_rows))
    head.__class__ = _fused_subclass(type(head), {method: _HEAD_METHODS[method]},
                                     f"whose decode-sized {method} calls run mlx_foundry's "
                                     "GEMV.")
    what = "linear" if method == "__call__" else "linear over the tied embeddings"
    report.fused.append((path, f"{what} ({_weight_summary(head)})"))


def _unpatch_head(model):
    if _head_plan(model) is not None:
        head = _head(model)[1]
        head.__class__ = type(head)._mlx_foundry_original
        object.__delattr__(head, _HEAD_ATTR)


# ------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------
def _model_type(model):
    mt = getattr(model, "model_type", None)
    if mt is None:
        args = getattr(model, "args", None)
        mt = getattr(args, "model_type", None)
    return mt if isinstance(mt, str) else None


def _blocks(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if isinstance(inner, nn.Module) else None
    if isinstance(layers, list):
        return "model.layers", layers
    layers = getattr(model, "layers", None)
    if isinstance(layers, list):
        return "layers", layers
    return None, None


def _default_max_rows():
    # ``mlx_foundry.ops.linear`` is the function once the package is imported.
    import importlib

    mod = importlib.import_module("mlx_foundry.ops.linear")
    return int(getattr(mod, "PREFILL_ROWS", _DEFAULT_MAX_ROWS))


def patch(model, *, backend=None, max_rows=None, attention=True, mlp=True, lm_head=True,
          joint_kv=True, decode_attention=False, compile_decode=None):
    """Fuse the decode path of an mlx-lm model's transformer blocks, in place.

    Args:
        model (nn.Module): an mlx-lm model (``mlx_lm.load``); model types
            ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` are fused, others are
            left untouched.
        backend (str, optional): backend of the fused ops (``"metal"``, ``"cuda"``,
            ``"reference"``). Default: ``None`` (chosen per call).
        max_rows (int, optional): blocks whose input has more rows (batch x
            tokens) run their original code (prefill is a GEMM). Default:
            ``mlx_foundry.ops.linear.PREFILL_ROWS``.
        attention (bool): fuse the attention half of each block. Default: ``True``.
        mlp (bool): fuse the MLP half of each block. Default: ``True``.
        lm_head (bool): run the model's output projection through the fused GEMV for
            decode-sized inputs: ``lm_head``, or with tied embeddings the embedding's
            ``as_linear`` (dense or affine quantized). Default: ``True``.
        joint_kv (bool): switch the plain mlx-lm ``KVCache`` objects that patched blocks
            decode with to :class:`mlx_foundry.kv_cache.KVCache` (the same cache, keys
            and values in one buffer: one write per token instead of two). Default:
            ``True``.
        decode_attention (bool): with ``joint_kv``, attend a decoded token of the
            ordinary step with :func:`mlx_foundry.ops.decode_attention` over the cache
            buffer (contexts up to :data:`DECODE_ATTENTION_MAX_LEN` positions, no mask)
            instead of key and value views and MLX's attention (the compiled step always
            attends with it). Default: ``False`` (not faster on MLX's CUDA backend; see
            :data:`DECODE_ATTENTION_MAX_LEN`).
        compile_decode (bool, optional): with ``joint_kv``, run each decoded token after
            the first through one ``mx.compile``'d function of the whole model (the
            blocks' fused launches, the cache writes and
            :func:`mlx_foundry.ops.decode_attention` at any context length), traced once
            per batch size and cache capacity (:mod:`mlx_foundry.lm_compiled`). It needs
            every block fused as a whole (Q/K/V with RoPE, and the MLP); otherwise the
            report says why it is off. Default: ``None``: on where the fused ops run on
            the CUDA backend (``backend``, or the one chosen when ``patch`` is called),
            where in every full ``bench`` run since 2c96b61 (seven, H100 and H200) it
            decoded faster than the ordinary step; off on the reference backend (tracing
            the reference ops costs more than it saves) and on Metal (not measured).

    Returns:
        PatchReport: what was fused and what was left as it was, and why.

    Examples:
        >>> from mlx_lm import load
        >>> import mlx_foundry as mf
        >>> model, tok = load("mlx-community/Llama-3.2-1B-Instruct-4bit")
        >>> print(mf.patch(model))
        >>> mf.unpatch(model)
    """
    who = "[mlx_foundry.patch]"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} 'model' must be an mlx.nn.Module but got "
                        f"{type(model).__name__}.")
    if backend is not None:
        from .backends import check_backend
        check_backend(backend, "mlx_foundry.patch")
    if max_rows is None:
        max_rows = _default_max_rows()
    elif isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"{who} 'max_rows' must be a positive int but got {max_rows!r}.")
    default_compile = compile_decode is None
    if default_compile:
        # Resolved before the model changes: a bad MLX_FOUNDRY_BACKEND raises here.
        from .backends import select_backend

        compile_decode = select_backend(backend, "mlx_foundry.patch") == "cuda"
    if is_patched(model):
        unpatch(model)
    mt = _model_type(model)
    report = PatchReport(model_type=mt or "?", backend=backend or "auto", max_rows=max_rows)
    root, blocks = _blocks(model)
    if mt not in SUPPORTED_MODEL_TYPES:
        report.skipped.append(("model", f"model type {mt!r} is not supported (supported: "
                                        f"{', '.join(SUPPORTED_MODEL_TYPES)})"))
        report.blocks = len(blocks or [])
        return report
    if blocks is None:
        report.skipped.append(("model", "no transformer blocks found at model.layers"))
        return report
    report.blocks = len(blocks)
    for i, block in enumerate(blocks):
        path = f"{root}.{i}"
        if not isinstance(block, nn.Module):
            report.skipped.append((path, f"{type(block).__name__} is not a module"))
            continue
        why = _check_structure(block)
        if why:
            report.skipped.append((path, why))
            continue
        arch = _KNOWN_BLOCK_MODULES[type(block).__module__]
        mode = rope = head_dim = None
        if attention:
            mode, rope, head_dim, what_a, reasons = _plan_attention(block, path, arch)
            report.skipped += reasons
            if mode:
                report.fused.append((f"{path}.self_attn", what_a))
        else:
            report.skipped.append((f"{path}.self_attn", "attention=False"))
        fuse_mlp = False
        if mlp:
            what_m, reasons = _plan_mlp(block, path)
            report.skipped += reasons
            if what_m:
                fuse_mlp = True
                report.fused.append((f"{path}.mlp", what_m))
        else:
            report.skipped.append((f"{path}.mlp", "mlp=False"))
        if not mode and not fuse_mlp:
            continue
        plan = _BlockPlan(path, type(block), arch, mode, fuse_mlp, rope, head_dim, backend,
                          max_rows, joint_kv=bool(joint_kv),
                          decode_attention=bool(decode_attention))
        object.__setattr__(block, _PLAN_ATTR, plan)
        block.__class__ = _patched_class(type(block))
    if lm_head:
        _patch_head(model, report, backend, max_rows)
    if compile_decode:
        _patch_compiled(model, report, blocks, bool(joint_kv), default_compile)
    object.__setattr__(model, _REPORT_ATTR, report)
    return report


def _patch_compiled(model, report, blocks, joint_kv, by_default=False):
    """Attach the compiled decode step (:mod:`mlx_foundry.lm_compiled`) when the whole
    model can be traced: every block fused as a whole, the joint K/V cache, a known
    model class without sliding-window layers or pipeline stages."""
    from .lm_compiled import DecodeRunner, compiled_model_class

    cls = type(model)
    plans = [b.__dict__.get(_PLAN_ATTR) if isinstance(b, nn.Module) else None for b in blocks]
    inner = getattr(model, "model", None)
    why = None
    if not joint_kv:
        why = "compile_decode needs joint_kv=True"
    elif cls.__module__ not in _KNOWN_BLOCK_MODULES or cls.__name__ != "Model":
        why = f"model class {cls.__module__}.{cls.__name__} is not known"
    elif getattr(inner, "swa_idx", None) is not None:
        why = "sliding-window layers"
    elif getattr(inner, "pipeline_size", 1) != 1:
        why = "pipeline stages"
    elif not plans or not all(p is not None and p.attn in _WHOLE_QKV and p.mlp for p in plans):
        why = "not every block is fused as a whole (Q/K/V with RoPE, and the MLP)"
    if why:
        which = " (the default on CUDA)" if by_default else ""
        report.skipped.append(("model", f"compiled decode{which} off: {why}"))
        return
    object.__setattr__(model, _RUNNER_ATTR, DecodeRunner(model, plans))
    model.__class__ = compiled_model_class(cls)
    report.compiled_decode = True
    report.fused.append(("model", "decode step compiled (mx.compile) after the first token"))


def _unpatch_compiled(model):
    if _RUNNER_ATTR in model.__dict__:
        model.__class__ = type(model)._mlx_foundry_original
        object.__delattr__(model, _RUNNER_ATTR)


def unpatch(model):
    """Restore the original transformer blocks of a patched model.

    Returns:
        int: the number of blocks restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("[mlx_foundry.unpatch] 'model' must be an mlx.nn.Module but got "
                        f"{type(model).__name__}.")
    _, blocks = _blocks(model)
    n = 0
    for block in blocks or []:
        plan = block.__dict__.get(_PLAN_ATTR) if isinstance(block, nn.Module) else None
        if plan is None:
            continue
        block.__class__ = plan.original_class
        object.__delattr__(block, _PLAN_ATTR)
        n += 1
    _unpatch_head(model)
    _unpatch_compiled(model)
    model.__dict__.pop(_REPORT_ATTR, None)
    return n


def is_patched(model):
    """Whether :func:`patch` changed any block of ``model``."""
    _, blocks = _blocks(model)
    return (any(isinstance(b, nn.Module) and _PLAN_ATTR in b.__dict__ for b in blocks or [])
            or _head_plan(model) is not None or _RUNNER_ATTR in model.__dict__)


def patch_stats(model):
    """How the patched blocks' calls ran: ``{block path: Counter}``.

    Keys of each counter: ``"fused attention"``, ``"fused mlp"``,
    ``"original: rows > max_rows"`` (prefill), ...; with the compiled decode step, the
    counter under ``"model"`` has ``"compiled decode steps"``, ``"decode steps on the
    ordinary path"`` (one-token calls the compiled step did not take), ``"compiled
    writes of a pending token"`` (compiled steps that wrote the previous token into the
    cache: all but the first of each run of compiled steps) and ``"traces"``,
    and each block's ``"fused attention"`` and ``"fused mlp"`` and the output head's
    ``"fused"`` (or ``"original"``) count the compiled steps too, as the traced step
    runs them.
    """
    _, blocks = _blocks(model)
    out = {}
    for b in blocks or []:
        plan = b.__dict__.get(_PLAN_ATTR) if isinstance(b, nn.Module) else None
        if plan is not None:
            c = out[plan.path] = Counter(plan.stats)
            if plan.fast_calls:
                c["fused attention"] += plan.fast_calls
                c["fused mlp"] += plan.fast_calls
    plan = _head_plan(model)
    if plan is not None:
        out[plan.path] = Counter(plan.stats)
    runner = model.__dict__.get(_RUNNER_ATTR)
    if runner is not None:
        for plan in runner.plans:
            c = out.get(plan.path)
            if c is not None:
                c["fused attention"] += runner.steps
                c["fused mlp"] += runner.steps
        head = _head_plan(model)
        if head is not None and runner.head_in_trace:
            out[head.path][runner.head_in_trace] += runner.steps
        out["model"] = Counter({"compiled decode steps": runner.steps,
                                "decode steps on the ordinary path": runner.fallbacks,
                                "compiled writes of a pending token": runner.pending_writes,
                                "traces": runner.traces})
    return out
