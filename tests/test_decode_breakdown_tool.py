"""tools/decode_breakdown.py's per-token breakdown on the tiny Llama (CPU): every figure
is there, and the pipelined loop's host and wait shares add up to its time per token."""

import pytest
from tool_loader import TOOLS, load_tool


@pytest.fixture(scope="module")
def tool():
    import sys
    sys.path.insert(0, str(TOOLS))
    try:
        yield load_tool("decode_breakdown")
    finally:
        sys.path.remove(str(TOOLS))


def test_breakdown_of_the_tiny_model(tool):
    model = tool.bench_model(tiny=True)
    r = tool.breakdown(model, tokens=4, skip=1, pipelined=6)
    assert set(r) == {"build_ms", "encode_ms", "wait_ms", "pipelined_ms",
                      "pipelined_host_ms", "pipelined_host_cpu_ms", "pipelined_wait_ms"}
    assert all(v >= 0 for v in r.values())
    # host + wait is the loop's body; the rest (the last token's wait, the loop) is small
    shares = r["pipelined_host_ms"] + r["pipelined_wait_ms"]
    assert shares <= r["pipelined_ms"] * 1.0001
    assert shares >= 0.7 * r["pipelined_ms"]
    # this thread's CPU time is part of its wall time (thread_time ticks coarser: 1 ms)
    assert r["pipelined_host_cpu_ms"] <= r["pipelined_host_ms"] + 1.0
