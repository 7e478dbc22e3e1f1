"""tools/host_cost.py: the ops and a patched model take their CUDA code paths with a
stand-in kernel object, on a machine without a GPU."""

import importlib

import mlx.core as mx
import pytest
from tool_loader import TOOLS, load_tool

import mlx_foundry as mf
from mlx_foundry import backends
from mlx_foundry.backends import cuda

lin = importlib.import_module("mlx_foundry.ops.linear")


@pytest.fixture
def host_cost(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))  # its sibling decode_breakdown
    mod = load_tool("host_cost")
    # Everything fake_cuda() replaces is put back afterwards, and the plans built with
    # the stand-in are forgotten: later tests (on a GPU too) see the real backend.
    backends._probe()
    monkeypatch.setattr(mx.fast, "cuda_kernel", mx.fast.cuda_kernel)
    monkeypatch.setattr(cuda, "INSTALL_PRELUDE", cuda.INSTALL_PRELUDE)
    monkeypatch.setitem(backends._available, "cuda", backends._available["cuda"])
    mf.clear_cache()
    lin.forget_launches()
    mod.fake_cuda()
    yield mod
    mf.clear_cache()
    lin.forget_launches()
    cuda.installed_prelude_include.cache_clear()  # it was resolved with INSTALL_PRELUDE off


def test_ops_take_the_cuda_launch_path(host_cost, monkeypatch):
    launched = []
    stand_in = mx.fast.cuda_kernel

    def counting(**kw):  # every kernel object built from here on counts its calls
        call = stand_in(**kw)

        def counted(**a):
            launched.append(kw["name"])
            return call(**a)
        return counted
    monkeypatch.setattr(mx.fast, "cuda_kernel", counting)
    calls = host_cost.op_calls(hidden=128, inter=256, head_dim=32)
    y = calls["linear"]()
    # The stand-in's zeros, not the reference's products: the CUDA path ran.
    assert y.shape == (1, 256) and y.dtype == mx.float16 and not mx.any(y).item()
    q, k, v = calls["qkv"]()
    assert q.shape == (1, 1, 4 * 32) and not mx.any(q).item()
    ops_before, before = len(launched), mf.cache_info()
    assert host_cost.time_calls(calls["linear"], calls=10, repeats=2) > 0
    after = mf.cache_info()
    # 50 warm-up calls, then 2 x 10, each a launch of the stand-in kernel. From the
    # second call on, the launch kept for the Weight (ops/_calls.py): after it, no plan
    # lookup, render or compile.
    assert len(launched) - ops_before == 70
    assert set(launched[ops_before:]) == {launched[0]}
    assert (after.misses, after.compiles) == (before.misses, before.compiles)
    assert after.hits <= before.hits + 1  # the second call's prepare


def test_patched_decode_takes_the_prepared_launches(host_cost):
    pytest.importorskip("mlx_lm")
    model, cache, token = host_cost.decode_model(layers=2, patched=True)
    assert host_cost.time_tokens(model, cache, token, tokens=3, warmup=1) > 0
    from mlx_foundry import lm

    stats = lm.patch_stats(model)
    fused = sum(c["fused attention"] + c["fused mlp"] for c in stats.values())
    assert fused >= 2 * 2 * 4  # two blocks, attention and MLP halves, four tokens
    logits = model(token, cache=cache)
    assert logits.shape == (1, 1, 512)
