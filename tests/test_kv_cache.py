"""mlx_foundry.kv_cache.KVCache (keys and values in one buffer) against mlx-lm's KVCache.

Every step of a seeded random sequence of updates (prefill chunks, single tokens,
updates through mlx-lm's two-array API and the joint one, growth past the 256-step
buffer, trims) must return exactly what mlx-lm's cache returns, and the state must
round-trip through mlx-lm's save/load.
"""

import mlx.core as mx
import pytest

pytest.importorskip("mlx_lm")

from mlx_lm.models import cache as lm_cache  # noqa: E402

from mlx_foundry import kv_cache  # noqa: E402

B, H, D = 2, 3, 8


def _kv(L, seed, dtype=mx.float16, d=D):
    k = mx.random.normal((B, H, L, d), key=mx.random.key(seed)).astype(dtype)
    v = mx.random.normal((B, H, L, d), key=mx.random.key(seed + 10_000)).astype(dtype)
    return k, v


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b).item()


def _check_state(ours, theirs):
    assert ours.offset == theirs.offset
    for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
        n = theirs.offset
        assert _same(a[..., :n, :], b[..., :n, :])
    assert ours.size() == theirs.size()
    assert ours.empty() == theirs.empty()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_mlx_lm_over_random_updates(seed):
    import random

    rnd = random.Random(seed)
    ours, theirs = kv_cache.KVCache(), lm_cache.KVCache()
    assert ours.empty() and theirs.empty()
    # ~600 positions: the buffers grow past two 256-steps; a trim and a second prefill.
    for i in range(140):
        L = rnd.choice([1, 1, 1, 1, 7, 33]) if i else 13
        k, v = _kv(L, 100 * seed + i)
        if rnd.random() < 0.5:
            got = ours.update_and_fetch_joint(mx.concatenate([k, v], axis=1))
        else:
            got = ours.update_and_fetch(k, v)
        want = theirs.update_and_fetch(k, v)
        assert _same(got[0], want[0]) and _same(got[1], want[1]), f"step {i}"
        _check_state(ours, theirs)
        if i == 70:
            assert ours.trim(5) == theirs.trim(5) == 5
            _check_state(ours, theirs)
    assert ours.offset > 512
    assert ours.nbytes == theirs.nbytes  # the same growth as mlx-lm's


def test_nbytes_counts_both_halves():
    ours, theirs = kv_cache.KVCache(), lm_cache.KVCache()
    k, v = _kv(3, 7)
    ours.update_and_fetch(k, v)
    theirs.update_and_fetch(k, v)
    assert ours.nbytes == theirs.nbytes == 2 * B * H * 256 * D * 2


def test_adopt_switches_a_plain_cache_in_place():
    c, ref = lm_cache.KVCache(), lm_cache.KVCache()
    k, v = _kv(9, 1)
    c.update_and_fetch(k, v)
    ref.update_and_fetch(k, v)
    assert kv_cache.adopt(c) is True
    assert type(c) is kv_cache.KVCache and isinstance(c, lm_cache.KVCache)
    _check_state(c, ref)
    for i in range(5):
        k, v = _kv(1, 50 + i)
        got = c.update_and_fetch_joint(mx.concatenate([k, v], axis=1))
        want = ref.update_and_fetch(k, v)
        assert _same(got[0], want[0]) and _same(got[1], want[1])
    assert kv_cache.adopt(c) is True  # already one
    # Other cache types are never switched.
    for other in (lm_cache.RotatingKVCache(max_size=8), lm_cache.QuantizedKVCache()):
        assert kv_cache.adopt(other) is False
        assert type(other) is not kv_cache.KVCache


def test_state_saves_and_loads_as_mlx_lm_kv_cache(tmp_path):
    ours, theirs = kv_cache.KVCache(), lm_cache.KVCache()
    for i, L in enumerate((5, 1, 1, 4)):
        k, v = _kv(L, 200 + i)
        ours.update_and_fetch_joint(mx.concatenate([k, v], axis=1))
        theirs.update_and_fetch(k, v)
    f = str(tmp_path / "prompt.safetensors")
    lm_cache.save_prompt_cache(f, [ours])
    (loaded,) = lm_cache.load_prompt_cache(f)
    assert type(loaded) is lm_cache.KVCache
    _check_state(loaded, theirs)
    # And back: a state set on our cache (mlx-lm's own code path) is used as given.
    again = kv_cache.KVCache.from_state(theirs.state)
    _check_state(again, theirs)
    k, v = _kv(1, 300)
    got = again.update_and_fetch_joint(mx.concatenate([k, v], axis=1))
    want = theirs.update_and_fetch(k, v)
    assert _same(got[0], want[0]) and _same(got[1], want[1])


def test_to_quantized_and_trim_prompt_cache():
    ours, theirs = kv_cache.KVCache(), lm_cache.KVCache()
    k, v = _kv(64, 9, mx.float32, d=32)
    ours.update_and_fetch(k, v)
    theirs.update_and_fetch(k, v)
    assert lm_cache.can_trim_prompt_cache([ours])
    assert lm_cache.trim_prompt_cache([ours], 10) == 10
    theirs.trim(10)
    _check_state(ours, theirs)
    qo, qt = ours.to_quantized(group_size=32, bits=8), theirs.to_quantized(group_size=32, bits=8)
    for a, b in zip(qo.keys + qo.values, qt.keys + qt.values):
        assert _same(a, b)


def test_values_with_another_head_dim_use_two_buffers():
    ours, theirs = kv_cache.KVCache(), lm_cache.KVCache()
    k = mx.random.normal((1, 2, 3, 8), key=mx.random.key(0))
    v = mx.random.normal((1, 2, 3, 4), key=mx.random.key(1))
    got, want = ours.update_and_fetch(k, v), theirs.update_and_fetch(k, v)
    assert _same(got[0], want[0]) and _same(got[1], want[1])


def test_bad_joint_input_names_the_argument():
    c = kv_cache.KVCache()
    with pytest.raises(ValueError, match="'kv'"):
        c.update_and_fetch_joint(mx.zeros((1, 3, 1, 8)))
    with pytest.raises(ValueError, match="'kv'"):
        c.update_and_fetch_joint(mx.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"\[KVCache.append_joint\] 'kv'"):
        c.append_joint(mx.zeros((1, 5, 1, 8)))
    assert c.offset == 0


def test_append_joint_returns_the_buffer_and_the_past_length():
    """append_joint gives decode attention the whole buffer with the token written (its
    first past_len positions are the earlier tokens); the cache then reads as mlx-lm's,
    across a growth of the buffer."""
    ours, ref = kv_cache.KVCache(), lm_cache.KVCache()
    k, v = _kv(255, 1)
    ours.update_and_fetch(k, v)
    ref.update_and_fetch(k, v)
    for i in range(3):  # positions 255, 256 (the buffer grows), 257
        k, v = _kv(1, 100 + i)
        buf, past_len = ours.append_joint(mx.concatenate([k, v], axis=1))
        ref.update_and_fetch(k, v)
        assert past_len == ref.offset - 1 == ours.offset - 1
        assert buf is ours._kv and buf.shape[2] >= ref.offset
        n = ref.offset
        assert mx.array_equal(buf[:, :H, :n], ref.keys[..., :n, :]).item()
        assert mx.array_equal(buf[:, H:, :n], ref.values[..., :n, :]).item()
        assert mx.array_equal(ours.keys[..., :n, :], ref.keys[..., :n, :]).item()
        assert mx.array_equal(ours.values[..., :n, :], ref.values[..., :n, :]).item()


def _with_pending(L, seed):
    """A joint cache of L tokens whose last token is pending (as the compiled decode step
    leaves it), and mlx-lm's cache of the same tokens."""
    ours, theirs = kv_cache.KVCache(), lm_cache.KVCache()
    k, v = _kv(L, seed)
    ours.update_and_fetch(k[..., :-1, :], v[..., :-1, :])
    ours.__dict__["_pending"] = mx.concatenate([k[..., -1:, :], v[..., -1:, :]], axis=1)
    ours.offset += 1
    theirs.update_and_fetch(k, v)
    return ours, theirs


@pytest.mark.parametrize("L", [3, 256, 257])
def test_a_pending_token_is_written_before_anything_reads_the_cache(L):
    """The buffer holds L - 1 tokens and the pending one waits apart (at L = 257 its
    write grows the buffer); keys, values, state, trim and the next update see it written,
    exactly as mlx-lm's cache has it."""
    for read in ("keys", "values", "state", "update", "trim", "save"):
        ours, theirs = _with_pending(L, seed=L)
        joint = ours.__dict__["_kv"]
        assert joint.shape[2] >= L - 1 and ours.offset == theirs.offset == L
        if read == "update":
            k, v = _kv(2, seed=99)
            ours.update_and_fetch(k, v)
            theirs.update_and_fetch(k, v)
        elif read == "trim":
            assert ours.trim(1) == theirs.trim(1) == 1
        elif read == "state":
            a, b = ours.state, theirs.state
            assert _same(a[0][..., :L, :], b[0][..., :L, :]) and a[2] == b[2] == L
        elif read == "save":
            continue  # test_a_pending_token_is_saved below
        else:
            getattr(ours, read)
        assert ours.__dict__["_pending"] is None
        _check_state(ours, theirs)


def test_a_pending_token_is_saved(tmp_path):
    ours, theirs = _with_pending(5, seed=4)
    path = str(tmp_path / "c.safetensors")
    lm_cache.save_prompt_cache(path, [ours])
    (loaded,) = lm_cache.load_prompt_cache(path)
    _check_state(loaded, theirs)
