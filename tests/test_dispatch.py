import pytest

import mlx_foundry as mf


def test_grid_counts_threads():
    cfg = mf.DispatchConfig(groups=(448, 2), threads=(256, 1))
    assert cfg.mlx_launch() == ((448 * 256, 2, 1), (256, 1, 1))
    assert mf.DispatchConfig.d1(4, 64).grid() == (256, 1, 1)


def test_presets():
    assert mf.per_element(1000, threads=256).groups == (4, 1, 1)
    assert mf.per_row(7, threads=128, batch=3).mlx_launch() == ((7 * 128, 3, 1), (128, 1, 1))
    cfg = mf.warp_per_row(14336, rows_per_warp=4, warps_per_group=8)
    assert cfg.threads == (256, 1, 1) and cfg.groups[0] == -(-14336 // 32)


def test_cuda_limit_on_y_and_z():
    cfg = mf.DispatchConfig(groups=(1, 70000), threads=(32, 1))
    assert cfg.mlx_launch("metal")[0] == (32, 70000, 1)
    with pytest.raises(ValueError, match="65535"):
        cfg.mlx_launch("cuda")
    # Presets keep large extents on x.
    mf.per_row(151936, threads=32).mlx_launch("cuda")


def test_invalid_configs():
    with pytest.raises(ValueError, match="exceeds 1024"):
        mf.DispatchConfig(groups=1, threads=(64, 32))
    with pytest.raises(ValueError, match="positive"):
        mf.DispatchConfig(groups=0, threads=32)
    with pytest.raises(ValueError, match="int32"):
        mf.DispatchConfig(groups=2**30, threads=32)
