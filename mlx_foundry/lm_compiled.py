"""The whole decode step of a patched model as one ``mx.compile``'d function.

Once the blocks of a model patched by :func:`mlx_foundry.patch` have fused their
decode path, building one token's graph in Python (the model's and the blocks'
``__call__``, ~6 prepared launches per block) costs the host about 1 ms per token of
a 32-block model: on MLX's CUDA backend that is as long as the device needs for the
token, so the decode is host-bound wherever the host is slow.  On the CUDA backend
(``patch``'s default there), or with ``patch(model, compile_decode=True)``, a decoded
token (one position, the joint K/V caches of :mod:`mlx_foundry.kv_cache`) runs instead
through a function that ``mx.compile`` traced once per batch size and cache capacity:
MLX replays the traced graph in C++, and Python only hands over the token, the position
and the cache buffers.

A traced function cannot depend on Python values that change per token, so the
position reaches the graph as arrays made on the device (the
:data:`~mlx_foundry.args.SCALAR_LANES` form the kernels read):

- the fused Q/K/V + RoPE launch takes it as its RoPE offset;
- the token's keys and values go into the cache buffer with
  ``mx.put_along_axis`` at that position, one ``scatter_axis`` kernel (a slice update
  needs a Python offset; ``mx.slice_update`` with an array start took 21 us per block
  on an H100, reading the start from host memory: BENCHMARKS.md);
- the attention is :func:`mlx_foundry.ops.decode_attention` over the whole buffer
  with the length as an array (one kernel up to
  :data:`~mlx_foundry.ops.attention.ONE_PASS_MAX_LEN` positions of capacity, else
  the split kernel and its merge).

The attention reads the buffer after the write, although it reads the token from
``kv`` and only the earlier positions from the buffer: MLX updates an array in place
only while nothing else holds it, and a kernel encoded or still pending on the old
buffer holds it. An attention over the buffer before the write (so that the write
would run beside the block in MLX's CUDA graph) took 0.915 of the time per token at a
16-token prompt on an H200 (a session script's interleaved rounds, not the bench), but
the GPU test that the write stays in place
(tests/test_gpu_lm.py) failed with it (session 29), as those rules predict: a copy of
the buffer per block and token, a cost that grows with the capacity.

Every other token (prefill, the first decoded token, which prepares the blocks'
launches, a token that must grow the cache buffers, other cache types, a model
whose weights changed) takes the patched model's ordinary path.
"""

import weakref
from collections import Counter

import mlx.core as mx

from .args import SCALAR_LANES

__all__ = ["TracedCache", "compiled_model_class", "DecodeRunner"]

_RUNNER_ATTR = "_mlx_foundry_decode"


class TracedCache:
    """What a patched block sees as its cache while the decode step is traced: the
    layer's joint K/V buffer (replaced by the block with the buffer after the write)
    and the position as device arrays."""

    __slots__ = ("buffer", "pos_i", "pos_u", "index")

    def __init__(self, buffer, pos_i, pos_u, index):
        self.buffer = buffer  # [B, 2 * H_kv, capacity, D]
        self.pos_i = pos_i    # int32 x SCALAR_LANES: the RoPE offset (the cached length)
        self.pos_u = pos_u    # uint32 x SCALAR_LANES: the same, as the attention's past_len
        self.index = index    # int32 [B, 2 * H_kv, 1, D], all the position: the write


class _NotTraceable(Exception):
    """A block met while tracing has no prepared one-token launches (then the token
    takes the ordinary path)."""


def traced_block(block, plan, x, cache):
    """One block's decode step inside the traced function (see the module docstring).

    Called by the patched block's ``__call__`` when its cache is a :class:`TracedCache`.
    """
    step = plan.steps.get((x.shape, x.dtype, True))
    fast = None if step is None else step.fast
    if fast is None or not fast[1]:
        raise _NotTraceable(plan.path)
    _, qkv_joint, o_proj, gate_up, down, _, attn = fast
    q, kv = qkv_joint(x, cache.pos_i)
    buffer = mx.put_along_axis(cache.buffer, cache.index, kv, axis=2)
    cache.buffer = buffer
    from .ops import decode_attention

    o = decode_attention(q, kv, buffer, past_len=cache.pos_u, scale=attn.scale,
                         backend=plan.backend)
    h = o_proj(o, x)
    return down(gate_up(h), h)


class DecodeRunner:
    """Runs one decoded token of a patched model through its compiled step.

    Attached to the model by :func:`mlx_foundry.patch` (by default on the CUDA backend);
    :meth:`step` returns the logits, or ``None`` when this call must take the
    ordinary path.
    """

    def __init__(self, model, plans):
        self.model = model
        self.plans = plans        # one per block, in order
        self.steps = 0            # tokens that ran compiled
        self.fallbacks = 0        # decode-shaped calls that took the ordinary path
        self.traces = 0           # compiled functions built (MLX traces each again per
        #                           cache capacity, by the shapes of the buffers)
        self.head_in_trace = None  # how the traced step ran the output head: "fused" or
        #                            "original" (its counter in patch_stats), or None
        self._fn = None           # the compiled function
        self._key = None          # (batch, dtype) of the compiled function
        self._top = None          # the model-level arrays the trace captured

    # -- the hot path ------------------------------------------------------------------
    def step(self, inputs, cache):
        """The logits of one decoded token, or ``None`` (take the ordinary path)."""
        from . import lm

        if (inputs.__class__ is not mx.array or inputs.ndim != 2 or inputs.shape[1] != 1
                or cache.__class__ is not list or len(cache) != len(self.plans)):
            return None
        joint_cls = lm._joint_cache()[0]
        first = cache[0]
        if first.__class__ is not joint_cls:
            return None
        offset = first.offset
        bufs = [c.__dict__.get("_kv") for c in cache]
        b0 = bufs[0]
        if (b0 is None or offset < 1 or offset >= b0.shape[2] or b0.shape[0] != inputs.shape[0]
                or not all(c.__class__ is joint_cls and c.offset == offset for c in cache)
                or not all(b is not None and b.shape == b0.shape for b in bufs)):
            self.fallbacks += 1
            return None
        if not self._ready(inputs.shape[0], b0.dtype):
            self.fallbacks += 1
            return None
        pos_i = mx.full((SCALAR_LANES,), offset, mx.int32)
        pos_u = mx.full((SCALAR_LANES,), offset, mx.uint32)
        # The caches let go of their buffers during the call, so that each put_along_axis
        # may update its buffer in place (MLX donates an array only it alone holds).
        for c in cache:
            c.__dict__["_kv"] = None
        try:
            outs = self._fn(inputs, pos_i, pos_u, *bufs)
        except BaseException:
            for c, b in zip(cache, bufs):
                c.__dict__["_kv"] = b
            raise
        del bufs, b0
        end = offset + 1
        for c, b in zip(cache, outs[1:]):
            c.__dict__["_kv"] = b
            c.offset = end
        self.steps += 1
        return outs[0]

    def _ready(self, batch, dtype):
        """Whether the compiled function matches the model now (tracing it if needed)."""
        from . import lm

        watch_holds = lm._watch_holds
        for plan in self.plans:
            if plan.watch is None or not watch_holds(plan.watch):
                self._fn = None  # new weights: the ordinary path prepares the launches again
                return False
        if self._fn is not None and self._key == (batch, dtype) and watch_holds(self._top):
            return True
        return self._trace(batch, dtype)

    # -- tracing ---------------------------------------------------------------------
    def _trace(self, batch, dtype):
        """Build the compiled function for this batch size and dtype, once every block
        has its one-token launches (prepared by the ordinary path's first token)."""
        from . import lm

        model = self.model
        key = ((batch, 1, model.args.hidden_size), dtype, True)  # as traced_block looks up
        for plan in self.plans:
            step = plan.steps.get(key)
            if step is None or step.fast is None or not step.fast[1]:
                return False
        original = type(model)._mlx_foundry_original
        # MLX keeps the compiled function (and what it captured) until the function
        # object goes; the model holds it, so the traced function must not hold the model.
        model_ref, runner_ref = weakref.ref(model), weakref.ref(self)

        def forward(inputs, pos_i, pos_u, *buffers):
            index = mx.broadcast_to(pos_i[:1].reshape(1, 1, 1, 1),
                                    (buffers[0].shape[0], buffers[0].shape[1], 1,
                                     buffers[0].shape[3]))
            caches = [TracedCache(b, pos_i, pos_u, index) for b in buffers]
            m = model_ref()
            head = lm._head_plan(m)
            counted = None if head is None else Counter(head.stats)
            try:
                logits = original.__call__(m, inputs, caches)
            finally:
                if head is not None:
                    # A trace is not a decoded token: patch_stats counts compiled steps.
                    ran = head.stats - counted
                    if ran:
                        runner_ref().head_in_trace = next(iter(ran))
                    head.stats = counted
            return (logits, *(c.buffer for c in caches))

        self._fn = mx.compile(forward)
        self._key = (batch, dtype)
        self._top = lm._top_watch_list(model)
        self.traces += 1
        return True


def compiled_model_class(cls):
    """The subclass of an mlx-lm ``Model`` class whose decode calls may run compiled."""
    from . import lm

    return lm._fused_subclass(cls, {"__call__": _model_call},
                              "whose one-token decode steps run compiled by mlx_foundry.")


def _model_call(self, inputs, cache=None, input_embeddings=None, **kwargs):
    runner = self.__dict__.get(_RUNNER_ATTR)
    if runner is not None and input_embeddings is None and not kwargs and cache is not None:
        try:
            out = runner.step(inputs, cache)
        except _NotTraceable:
            runner._fn = None
            out = None
        if out is not None:
            return out
    original = type(self)._mlx_foundry_original
    if kwargs:
        return original.__call__(self, inputs, cache, input_embeddings, **kwargs)
    return original.__call__(self, inputs, cache, input_embeddings)
