"""tools/cache_copies.py: its per-token summary, and a tiny decode on the CPU."""

import pytest
from tool_loader import TOOLS, load_tool


@pytest.fixture
def tool(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))  # main() imports decode_breakdown beside it
    return load_tool("cache_copies")


def test_summary_drops_the_first_tokens_and_counts_block_sized_peaks(tool):
    skip = tool.SKIP
    # SKIP dropped tokens (huge peaks, slow), then 5 tokens 2 ms apart; blocks of 1 MB,
    # two tokens peaked at a block or more.
    stamps = [0.5 * i for i in range(skip)] + [10.0 + 0.002 * i for i in range(5)]
    peaks = [10**9] * skip + [0, 1_000_000, 300_000, 2_000_000, 100_000]
    s = tool.summary(stamps, peaks, 1_000_000)
    assert s["tokens"] == 5 and s["tokens_with_peak_of_a_block"] == 2
    assert s["block_mb"] == 1.0 and s["peak_mb_max"] == 2.0 and s["peak_mb_median"] == 0.3
    assert s["median_ms"] == pytest.approx(2.0) and s["tok_s"] == pytest.approx(500.0)
    with pytest.raises(ValueError, match="'stamps' must hold more than"):
        tool.summary(stamps[:skip + 1], peaks[:skip + 1], 1)
    with pytest.raises(ValueError, match="one entry per token"):
        tool.summary(stamps, peaks[:-1], 1)


def test_main_runs_a_tiny_decode(tool, capsys):
    from mlx_foundry.bench.e2e import TINY_LLAMA

    assert TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"] == 32
    pytest.importorskip("mlx_lm")
    # (On a GPU machine too this runs on the CPU device: tests/conftest.py.)
    res = tool.main(["--tiny", "--prompts", "16", "40", "--tokens", "12", "--rounds", "1",
                     "--variants", "unpatched", "compiled"])
    assert sorted(res) == sorted(f"prompt {n} {v} round 0" for n in (16, 40)
                                 for v in ("unpatched", "compiled"))
    for key, r in res.items():
        assert r["tokens"] == 12 - tool.SKIP and r["tok_s"] > 0, (key, r)
        assert r["block_mb"] > 0 and r["peak_mb_max"] >= r["peak_mb_median"], (key, r)
    out = capsys.readouterr().out
    assert all(key in out for key in res)
    # mlx-lm's cache at 16 + 12 positions: keys and values of 2 KV heads x 32 dims in one
    # 256-position step, float16.
    assert res["prompt 16 unpatched round 0"]["block_mb"] == round(2 * 2 * 256 * 32 * 2 / 1e6, 2)


def test_main_refuses_too_few_tokens(tool):
    with pytest.raises(SystemExit):
        tool.main(["--tiny", "--tokens", "3"])
