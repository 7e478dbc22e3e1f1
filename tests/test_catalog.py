"""The catalog covers every public op and every kernel passes the Metal check."""

import pytest

from mlx_foundry import catalog, ops
from mlx_foundry.kernel import Program


def test_every_entry_builds_a_program():
    names = set()
    for e in catalog.entries():
        program, args, kwargs = e.build()
        assert isinstance(program, Program), e.name
        src = program.source(*args, backend="metal", **kwargs)
        assert src.body and src.name.startswith(program.name)
        names.add(e.name)
    assert len(names) == len(catalog.entries())


def test_every_public_op_is_in_the_catalog():
    walked = {e.name.split("_f")[0] for e in catalog.entries()}
    for op in ("rms_norm", "add_rms_norm", "softmax", "rope", "linear", "norm_linear",
               "norm_gate_up_swiglu", "norm_qkv_rope", "decode_attention"):
        assert any(n == op or n.startswith(op + "_") for n in walked), op
    assert set(ops.__all__ if hasattr(ops, "__all__") else []) <= set(dir(ops))


def test_full_metal_source_of_every_kernel_passes_the_check():
    pytest.importorskip("clang.cindex", reason="libclang (the test extra) is not installed")
    from mlx_foundry.metal_check import check_source, format_diagnostics

    failures = []
    for e in catalog.entries():
        program, args, kwargs = e.build()
        diags = [d for d in check_source(program.metal_source(*args, **kwargs),
                                         kernel_name=e.name) if d.severity == "error"]
        if diags:
            failures.append(format_diagnostics(diags))
    assert not failures, "\n".join(failures)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(KeyError, match="No kernel named 'nope'"):
        catalog.get("nope")


METAL_THREADGROUP_BYTES = 32 * 1024
"""The threadgroup memory a Metal threadgroup may have on Apple GPUs
(``maxThreadgroupMemoryLength``)."""
_ELEMENT_BYTES = {"float": 4, "uint4": 16}


def test_threadgroup_memory_of_every_kernel_fits_metal():
    """Every catalog kernel declares at most 32 KB of threadgroup memory (the GEMV's
    staged row of x is the largest: 1x14336 f16, 30 KB plus the partial sums)."""
    largest = 0
    for e in catalog.entries():
        for program, args, kwargs in e.launches():
            bound, given = program.bind(*args, **kwargs)
            consts = program._constants(bound, given)
            total = sum(t.resolved_count(consts) * _ELEMENT_BYTES[t.type]
                        for t in program.threadgroup)
            assert total <= METAL_THREADGROUP_BYTES, (e.name, total)
            largest = max(largest, total)
    assert largest == 1906 * 16 + 128 * 4  # linear_q4g64_f16_k14336_residual
