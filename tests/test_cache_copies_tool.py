"""tools/cache_copies.py: its per-token summary, and one tiny decode on the CPU."""

import importlib.util
import pathlib
import sys

import pytest

TOOLS = pathlib.Path(__file__).resolve().parent.parent / "tools"


def _tool():
    sys.path.insert(0, str(TOOLS))  # the tool imports decode_breakdown beside it
    try:
        spec = importlib.util.spec_from_file_location("cache_copies", TOOLS / "cache_copies.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(TOOLS))
    return mod


def test_summary_drops_the_first_tokens_and_counts_copies():
    tool = _tool()
    skip = tool.SKIP
    # 8 dropped tokens (huge peaks, slow), then 5 tokens 2 ms apart, two of which copied a
    # 1 MB buffer.
    times = [0.5 * i for i in range(skip)] + [10.0 + 0.002 * i for i in range(5)]
    peaks = [1e9] * skip + [0, 1_000_000, 0, 2_000_000, 100_000]
    s = tool.summary(times, peaks)
    assert s["tokens"] == 5 and s["tokens_with_peak_over_0.5mb"] == 2
    assert s["peak_mb_max"] == 2.0 and s["peak_mb_median"] == 0.1
    assert s["median_ms"] == pytest.approx(2.0) and s["tok_s"] == pytest.approx(500.0)
    with pytest.raises(ValueError, match="need more than"):
        tool.summary(times[:skip + 1], peaks[:skip + 1])


def test_decode_peaks_sees_every_token():
    pytest.importorskip("mlx_lm")
    tool = _tool()
    from mlx_foundry.bench.e2e import TINY_LLAMA
    from mlx_foundry.lm_bench import random_quantized_model

    model = random_quantized_model(TINY_LLAMA)
    times, peaks = tool.decode_peaks(model, [1, 2, 3], 12)
    assert len(times) == len(peaks) == 12
    assert times == sorted(times) and all(p >= 0 for p in peaks)
