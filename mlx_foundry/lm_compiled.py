"""The whole decode step of a patched model as one ``mx.compile``'d function.

Once the blocks of a model patched by :func:`mlx_foundry.patch` have fused their
decode path, building one token's graph in Python (the model's and the blocks'
``__call__``, ~6 prepared launches per block) costs the host about 1 ms per token of
a 32-block model: on MLX's CUDA backend that is as long as the device needs for the
token, so the decode is host-bound wherever the host is slow.  On the CUDA backend
(``patch``'s default there), or with ``patch(model, compile_decode=True)``, a decoded
token (one position, the joint K/V caches of :mod:`mlx_foundry.kv_cache`) runs instead
through a function that ``mx.compile`` traced once per batch size and cache capacity:
MLX replays the traced graph in C++, and Python only hands over the token, the position,
the cache buffers and the tokens pending their write (below).

A traced function cannot depend on Python values that change per token, so the
position reaches the graph as arrays made on the device (the
:data:`~mlx_foundry.args.SCALAR_LANES` form the kernels read):

- the fused Q/K/V + RoPE launch takes it as its RoPE offset;
- the attention is :func:`mlx_foundry.ops.decode_attention` over the whole buffer
  with the length as an array (one kernel up to
  :data:`~mlx_foundry.ops.attention.ONE_PASS_MAX_LEN` positions of capacity, else
  the split kernel and its merge).

A token's keys and values go into the cache buffer one token late: each compiled token
writes the *previous* token's (``mx.put_along_axis`` at its position, one
``scatter_axis`` kernel; a slice update needs a Python offset, and ``mx.slice_update``
with an array start took 21 us per block on an H100, reading the start from host memory:
docs/bench_journal.md; its index is the attention's uint32 length array, broadcast, so a
token makes two position arrays, not three), and its attention reads that token from the
cache's pending array (``decode_attention(..., pending=)``) and its own from ``kv``. The
write's inputs are ready when the token starts, so in MLX's CUDA graph it runs beside
the blocks before it, not between the block's Q/K/V kernel and its attention. The
attention still takes the buffer the write returns: MLX updates an array in place only
while nothing else holds it, and a kernel encoded (or still running) on the old buffer
holds it. (Session 29 tried the attention over the buffer *before* a same-token write,
which also takes the write off the path: 0.915 of the time per token in a session script
at a 16-token prompt on an H200, but the write then copied the buffer, a cost that grows
with the capacity; tests/test_gpu_lm.py caught it.) The first compiled token after the
ordinary path has no pending token: it writes nothing and leaves its own pending (a
second traced function). Until the next compiled token the cache holds the token apart
(:class:`mlx_foundry.kv_cache.KVCache`, which writes it first whenever anything else
reads or changes the cache).

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
    layer's joint K/V buffer (replaced by the block with the buffer after the write),
    the pending token (replaced by this token's keys and values) and the positions as
    device arrays."""

    __slots__ = ("buffer", "pending", "pos_i", "pos_u", "index")

    def __init__(self, buffer, pending, pos_i, pos_u, index):
        self.buffer = buffer    # [B, 2 * H_kv, capacity, D]
        self.pending = pending  # [B, 2 * H_kv, 1, D]: the previous token's, or None
        self.pos_i = pos_i      # int32 x SCALAR_LANES: the RoPE offset (the cached length)
        self.pos_u = pos_u      # uint32 x SCALAR_LANES: positions in the buffer before the
        #                         pending token (the attention's past_len)
        self.index = index      # uint32 [B, 2 * H_kv, 1, D], all pos_u: the pending write


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
    from .ops import decode_attention

    pending = cache.pending
    if pending is not None:
        # The previous token's write: its inputs are ready at the start of the token.
        cache.buffer = mx.put_along_axis(cache.buffer, cache.index, pending, axis=2)
    o = decode_attention(q, kv, cache.buffer, past_len=cache.pos_u, pending=pending,
                         scale=attn.scale, backend=plan.backend)
    cache.pending = kv
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
        self.pending_writes = 0   # steps that wrote the previous token (with a pending one)
        self.traces = 0           # compiled pairs built (MLX traces each again per cache
        #                           capacity, by the shapes of the buffers)
        self.head_in_trace = None  # how the traced step ran the output head: "fused" or
        #                            "original" (its counter in patch_stats), or None
        self._fn = None           # {with a pending token: compiled function}
        self._key = None          # (batch, dtype) of the compiled functions
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
        pends = [c.__dict__.get("_pending") for c in cache]
        b0 = bufs[0]
        pending = pends[0] is not None
        # In the buffer: offset - 1 positions and the pending token's place, or offset.
        if (b0 is None or offset < 1 or offset - 1 >= b0.shape[2]
                or b0.shape[0] != inputs.shape[0]
                or not all(c.__class__ is joint_cls and c.offset == offset for c in cache)
                or not all(b is not None and b.shape == b0.shape for b in bufs)
                or not all((p is not None) == pending for p in pends)):
            self.fallbacks += 1
            return None
        if not self._ready(inputs.shape[0], b0.dtype):
            self.fallbacks += 1
            return None
        past = offset - 1 if pending else offset
        pos_i = mx.full((SCALAR_LANES,), offset, mx.int32)
        pos_u = mx.full((SCALAR_LANES,), past, mx.uint32)
        n = len(cache)
        if pending:
            # The caches let go of their buffers during the call, so that each
            # put_along_axis may update its buffer in place (MLX donates an array only it
            # alone holds).
            for c in cache:
                c.__dict__["_kv"] = c.__dict__["_pending"] = None
            try:
                outs = self._fn[True](inputs, pos_i, pos_u, *bufs, *pends)
            except BaseException:
                for c, b, p in zip(cache, bufs, pends):
                    c.__dict__["_kv"], c.__dict__["_pending"] = b, p
                raise
            del bufs, b0, pends
            new_bufs, new_pends = outs[1:1 + n], outs[1 + n:]
            self.pending_writes += 1
        else:
            outs = self._fn[False](inputs, pos_i, pos_u, *bufs)
            new_bufs, new_pends = bufs, outs[1:]
        end = offset + 1
        for c, b, p in zip(cache, new_bufs, new_pends):
            c.__dict__["_kv"], c.__dict__["_pending"] = b, p
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

        def forward(inputs, pos_i, pos_u, buffers, pendings):
            writes = pendings[0] is not None  # the previous token's, into the buffers
            index = None
            if writes:
                # The pending token goes to position past_len (pos_u): the uint32 array
                # serves as the write's index too, so a token builds no third scalar.
                index = mx.broadcast_to(pos_u[:1].reshape(1, 1, 1, 1),
                                        (buffers[0].shape[0], buffers[0].shape[1], 1,
                                         buffers[0].shape[3]))
            caches = [TracedCache(b, p, pos_i, pos_u, index)
                      for b, p in zip(buffers, pendings)]
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
            kvs = tuple(c.pending for c in caches)
            if not writes:
                return (logits, *kvs)
            return (logits, *(c.buffer for c in caches), *kvs)

        n = len(self.plans)

        def first(inputs, pos_i, pos_u, *buffers):  # no pending token: no write
            return forward(inputs, pos_i, pos_u, buffers, (None,) * n)

        def next_(inputs, pos_i, pos_u, *arrays):  # buffers, then pending tokens
            return forward(inputs, pos_i, pos_u, arrays[:n], arrays[n:])

        self._fn = {False: mx.compile(first), True: mx.compile(next_)}
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
