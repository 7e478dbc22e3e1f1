"""The CUDA backend's source assembly (no GPU needed)."""

import mlx.core as mx
import pytest

from mlx_foundry.backends import cuda, cuda_compat

import core_kernels as ck


@pytest.fixture
def fresh_install(monkeypatch):
    cuda.installed_prelude_include.cache_clear()
    yield
    cuda.installed_prelude_include.cache_clear()


def test_prelude_is_installed_as_a_content_named_include(fresh_install):
    line = cuda.installed_prelude_include()
    if line is None:
        pytest.skip("MLX's include directory is not writable here")
    name = line.split('"')[1]
    root = __import__("pathlib").Path(mx.__file__).resolve().parent / "include"
    assert name.startswith("mlx_foundry/metal_compat_") and name.endswith(".cuh")
    assert (root / name).read_text() == cuda_compat.prelude()
    src = ck.row_sum_kernel().source(ck.seeded((2, 40), mx.float16), scale=1.0, backend="cuda")
    assert src.header.startswith(line)
    # the prelude is not pasted into the source MLX hashes on every launch
    assert len(src.header) < len(cuda_compat.prelude()) / 4


def test_prelude_inlined_when_installing_is_off(fresh_install, monkeypatch):
    monkeypatch.setattr(cuda, "INSTALL_PRELUDE", False)
    src = ck.row_sum_kernel().source(ck.seeded((2, 40), mx.float16), scale=1.0, backend="cuda")
    assert src.header.startswith(cuda_compat.prelude())
    assert "namespace mlx::core::cu {" in src.header


def test_cuda_and_metal_bodies_differ_only_in_the_cuda_preamble_and_shared_memory():
    k = ck.row_sum_kernel()
    x = ck.seeded((2, 40), mx.float16)
    metal = k.source(x, scale=1.0, backend="metal").body
    cuda_body = k.source(x, scale=1.0, backend="cuda").body
    assert "threadgroup float scratch[32];" in metal
    assert "__shared__" in cuda_body and "threadgroup float scratch" not in cuda_body
    assert "const uint3 threadgroup_position_in_grid =" in cuda_body
    assert metal.splitlines()[-1] == cuda_body.splitlines()[-1]  # the same stage call


def test_kernel_header_installed_and_included_by_one_line(fresh_install, monkeypatch):
    """MLX copies the header into the source on every call: it gets one #include line."""
    if cuda.installed_prelude_include() is None:
        pytest.skip("MLX's include directory is not writable here")
    seen = {}

    def fake_cuda_kernel(**kw):
        seen.update(kw)
        return lambda **_: None

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    src = ck.row_sum_kernel().source(ck.seeded((2, 40), mx.float16), scale=1.0, backend="cuda")
    cuda.build(src)
    line = seen["header"]
    assert line == f'#include "mlx_foundry/kernels/{src.name}.cuh"\n'
    root = __import__("pathlib").Path(mx.__file__).resolve().parent / "include"
    assert (root / "mlx_foundry" / "kernels" / f"{src.name}.cuh").read_text() == src.header
    assert seen["source"] == src.body and seen["name"] == src.name


def test_kernel_header_passed_whole_when_installing_is_off(fresh_install, monkeypatch):
    monkeypatch.setattr(cuda, "INSTALL_PRELUDE", False)
    seen = {}
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: seen.update(kw))
    src = ck.row_sum_kernel().source(ck.seeded((2, 40), mx.float16), scale=1.0, backend="cuda")
    cuda.build(src)
    assert seen["header"] == src.header
