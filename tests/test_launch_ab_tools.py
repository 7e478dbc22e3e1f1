"""tools/decode_launch_ab.py and tools/node_cost.py on the reference backend (CPU): the
commands run, check their launches against each other, and time what they say."""

import pytest
from tool_loader import TOOLS, load_tool


@pytest.fixture(scope="module")
def launch_ab():
    # Its folder on sys.path: it imports gemv_ab beside it.
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(TOOLS))
        yield load_tool("decode_launch_ab")


@pytest.mark.parametrize("op,launches", [
    ("norm_gate_up_swiglu", ["r4t128s0b4", "r3t128s0"]),
    # The Q/K/V kernel takes no MBLOCK (the tool once passed it one, refused at bind).
    ("norm_qkv_rope+joint_kv", ["r4t128s0", "r8t128s1"]),
])
def test_decode_launch_ab_times_every_launch_both_ways(launch_ab, capsys, op, launches):
    res = launch_ab.main([op, "--launches", *launches, "--rounds", "1", "--calls", "2",
                          "--backend", "reference"])
    assert set(res) == {"chained", "independent"}
    for mode in res.values():
        assert set(mode) == set(launches) and all(t > 0 for t in mode.values())
    out = capsys.readouterr().out
    # The reference ignores launch constants: every launch agrees with the first exactly.
    assert f"check {launches[1]}: max |diff| against {launches[0]} 0\n" in out


def test_kernel_runner_chain_waits_for_the_previous_call():
    """Chained, each call gets a new x made from the previous call's output (so the graph
    orders them), equal in value to its own; independent, its own x as it is."""
    import mlx.core as mx

    from mlx_foundry.bench.autotune import kernel_runner

    seen = []

    def kern(backend, x, **kw):
        seen.append(x)
        return x * 2

    xs = [mx.arange(4, dtype=mx.float16) + i for i in range(3)]
    for chained in (True, False):
        seen.clear()
        run = kernel_runner(kern, "reference", {"ROWS": 4}, chained=chained)
        for x in xs:
            run({"x": x})
        assert seen[0] is xs[0]
        for x, got in zip(xs[1:], seen[1:]):
            assert (got is x) is not chained
            assert mx.array_equal(got, x).item()


@pytest.mark.parametrize("argv,match", [
    (["no_such_op", "--launches", "r4t128s0"], "unknown op"),
    (["o_proj+residual", "--launches", "r4t128"], "rRtTsS"),
])
def test_decode_launch_ab_refuses_bad_arguments(launch_ab, argv, match):
    with pytest.raises((SystemExit, ValueError), match=match):
        launch_ab.main(argv + ["--backend", "reference", "--rounds", "1"])


def test_node_cost_measures_every_case(capsys):
    tool = load_tool("node_cost")
    res = tool.main(["--calls", "4", "--repeats", "1"])
    assert set(res) == set(tool.cases())
    assert all(ev > 0 and build > 0 for ev, build in res.values())
    assert "ops.linear q4 (Weight)" in capsys.readouterr().out
