"""A KV cache that keeps keys and values in one buffer (needs mlx-lm).

mlx-lm's ``KVCache`` stores keys and values in two buffers ``[B, H_kv, S, D]`` and
writes each decoded token into both: two slice updates, i.e. two graph nodes and
two copy kernels per attention layer and token.  :class:`KVCache` here is the
same cache with both in one buffer ``[B, 2 * H_kv, S, D]`` (keys in the first
``H_kv`` heads): ``norm_qkv_rope(..., joint_kv=True)`` produces one token's keys
and values as ``[B, 2 * H_kv, 1, D]``, and :meth:`KVCache.update_and_fetch_joint`
writes them with one update.  Keys and values come back as views of the buffer
(strided, as mlx-lm's ``keys[..., :offset, :]`` already are).

The compiled decode step (:mod:`mlx_foundry.lm_compiled`) writes each token's keys and
values into the buffer during the next token, beside that token's blocks; until then the
token is *pending* (counted in ``offset``, held apart). Everything that reads or changes
the cache otherwise (``keys``, ``values``, ``state``, ``trim``, the next write) writes the
pending token first, so the cache reads as it would without it.

It is a subclass of mlx-lm's ``KVCache`` with the same state, so everything that
takes an mlx-lm cache takes it (``generate``, ``trim_prompt_cache``,
``to_quantized``, ``BatchKVCache.merge``).  It is named ``KVCache`` on purpose:
``save_prompt_cache`` stores the class name and ``load_prompt_cache`` looks it up
in mlx-lm, so a saved cache loads back as mlx-lm's ``KVCache`` with the same
content.  :func:`mlx_foundry.patch` switches the plain mlx-lm ``KVCache`` objects
its patched blocks decode with to this class (``patch(model, joint_kv=False)``
keeps them as they are).
"""

import mlx.core as mx
from mlx_lm.models.cache import KVCache as _MLXKVCache

__all__ = ["KVCache", "adopt"]


class KVCache(_MLXKVCache):
    """mlx-lm's ``KVCache`` with keys and values in one buffer ``[B, 2 * H_kv, S, D]``.

    ``keys`` and ``values`` read as views of the buffer; assigning either (mlx-lm's
    own code paths, ``state``) stores it on its own until the next
    :meth:`update_and_fetch_joint` joins them again.
    """

    def __init__(self):
        self.__dict__["_kv"] = None
        self.__dict__["_pending"] = None
        super().__init__()

    # ---- keys / values: views of the joint buffer, or stored separately ----------------
    @property
    def keys(self):
        self._write_pending()
        kv = self.__dict__.get("_kv")
        if kv is not None:
            return kv[:, : kv.shape[1] // 2]
        return self.__dict__.get("keys")

    @keys.setter
    def keys(self, value):
        self._separate()
        self.__dict__["keys"] = value

    @property
    def values(self):
        self._write_pending()
        kv = self.__dict__.get("_kv")
        if kv is not None:
            return kv[:, kv.shape[1] // 2:]
        return self.__dict__.get("values")

    @values.setter
    def values(self, value):
        self._separate()
        self.__dict__["values"] = value

    def _separate(self):
        """Store keys and values as two arrays (views of the joint buffer, if any)."""
        self._write_pending()
        d = self.__dict__
        kv = d.get("_kv")
        if kv is not None:
            h = kv.shape[1] // 2
            d["keys"], d["values"], d["_kv"] = kv[:, :h], kv[:, h:], None

    # ---- updates -------------------------------------------------------------------
    def update_and_fetch_joint(self, kv):
        """Append keys and values given as one array; return ``(keys, values)`` so far.

        Args:
            kv (array): ``[B, 2 * H_kv, L, D]``, keys in the first ``H_kv`` heads.

        Returns:
            tuple(array, array): keys and values ``[B, H_kv, offset, D]`` (views).
        """
        joint, end = self._write(kv, "update_and_fetch_joint")
        h = kv.shape[1] // 2
        if end < joint.shape[2]:
            return joint[:, :h, :end, :], joint[:, h:, :end, :]
        return joint[:, :h], joint[:, h:]

    def append_joint(self, kv):
        """Append keys and values given as one array; return ``(buffer, past_len)``.

        The whole joint buffer after the write, whose first ``past_len`` positions
        hold the earlier tokens: what :func:`mlx_foundry.ops.decode_attention` takes
        (with the new token read from ``kv``), so a decode step needs no key and
        value views.

        Args:
            kv (array): ``[B, 2 * H_kv, L, D]``, keys in the first ``H_kv`` heads.

        Returns:
            tuple(array, int): the buffer ``[B, 2 * H_kv, capacity, D]`` and ``past_len``.
        """
        joint, end = self._write(kv, "append_joint")
        return joint, end - kv.shape[2]

    def _write(self, kv, who):
        """Write ``kv`` after the cached positions (growing the buffer if needed); return
        ``(buffer, new offset)``."""
        if kv.ndim != 4 or kv.shape[1] % 2:
            raise ValueError(f"[KVCache.{who}] 'kv' must be [B, 2 * n_kv_heads, L, "
                             f"head_dim] but got shape {tuple(kv.shape)}.")
        self._write_pending()
        prev = self.offset
        end = prev + kv.shape[2]
        joint = self.__dict__.get("_kv")
        if joint is None or end > joint.shape[2]:
            joint = self._grow(kv, prev)
        # The write must come before anything reads the buffer in the same step: MLX
        # updates it in place only while no other kernel (even one in flight) holds it,
        # else it copies the whole buffer (measured: a lazy write after an attention
        # over the old buffer cost a full copy per layer and token).
        joint[:, :, prev:end] = kv
        self.offset = end
        return joint, end

    def _grow(self, kv, prev):
        """A joint buffer with room for ``kv`` after the first ``prev`` positions (mlx-lm's
        growth: whole steps of :attr:`step` past ``prev``), holding what is cached."""
        B, H2, L, D = kv.shape
        d = self.__dict__
        n_steps = (self.step + L - 1) // self.step
        new = mx.zeros((B, H2, prev + n_steps * self.step, D), kv.dtype)
        if prev > 0:
            joint = d.get("_kv")
            if joint is None:  # keys and values stored apart (set by mlx-lm's code paths)
                joint = mx.concatenate([d["keys"][..., :prev, :], d["values"][..., :prev, :]],
                                       axis=1)
            new[..., :prev, :] = joint[..., :prev, :]
        d["keys"] = d["values"] = None
        d["_kv"] = new
        return new

    def _write_pending(self):
        """Write the token the compiled decode step left pending, if any (its position is
        the last one that ``offset`` counts)."""
        d = self.__dict__
        pending = d.get("_pending")
        if pending is not None:
            d["_pending"] = None
            self.offset -= 1
            self._write(pending, "write_pending")

    def trim(self, n):
        """mlx-lm's ``trim``, after writing a pending token."""
        self._write_pending()
        return super().trim(n)

    def update_and_fetch(self, keys, values):
        """mlx-lm's ``update_and_fetch``: one update of the joint buffer when keys and
        values have the same shape, else mlx-lm's two buffers."""
        if keys.shape == values.shape and keys.dtype == values.dtype:
            return self.update_and_fetch_joint(mx.concatenate([keys, values], axis=1))
        self._separate()
        return super().update_and_fetch(keys, values)


def adopt(cache):
    """Switch a plain mlx-lm ``KVCache`` to :class:`KVCache` in place (same state);
    return whether ``cache`` is now one."""
    cls = cache.__class__
    if cls is KVCache:
        return True
    if cls is not _MLXKVCache:
        return False
    d = cache.__dict__
    d.setdefault("_kv", None)
    d.setdefault("_pending", None)
    cache.__class__ = KVCache
    return True
