"""tools/gemv_ab.py: its variants' parsing, its source edits against the kernel as it is
now, the launches it records (CPU), and the CUDA units it builds (nvcc, where present)."""

import mlx.core as mx
import numpy as np
import pytest
from tool_loader import TOOLS, load_tool


@pytest.fixture(scope="module")
def tool():
    # Its folder on sys.path: the mma: variant imports tools/gemv_mma.py beside it.
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(TOOLS))
        yield load_tool("gemv_ab")


@pytest.fixture(scope="module")
def recorded(tool):
    """The tool's dry run on a small shape: every kind of variant, its launch recorded."""
    variants = ["read", "mlx", "op", "weight", "r8t128s1", "r8t224s1b2", "sbi:r8t128s1",
                "hsum:r8t128s1", "l2sb:r8t128s1", "l2w:r4t128s0", "sbs:r8t128s1",
                "sbs:r4t128s0", "xpf:r8t128s1b4",
                "fence:r4t128s1", "acp:r4t128s1",
                "acq:r8t128s1", "acp:r4t128s0", "l2p:r8t128s1", "l2p:r4t128s0",
                "mma:t2s4b4", "mma:t1s2a4",
                "pattern:wsb", "pattern:w@r4t256s0", "pattern:wsbi"]
    return tool.main(["--dry", "--shape", "1024x256", "--variants", *variants])


def test_launches_and_variants_parse(tool):
    assert tool.parse_launch("r8t128s1b4") == {"ROWS": 8, "THREADS": 128, "SPLITK": 1,
                                               "MINBLOCKS": 4}
    assert tool.parse_launch("r4t224s0") == {"ROWS": 4, "THREADS": 224, "SPLITK": 0}
    assert tool.parse_variant("op") == ("op", None)
    assert tool.parse_variant("weight") == ("weight", None)
    assert tool.parse_variant("xpf:r8t64s1") == ("xpf", {"ROWS": 8, "THREADS": 64,
                                                         "SPLITK": 1})
    assert tool.parse_variant("fence:r4t128s0") == ("fence", {"ROWS": 4, "THREADS": 128,
                                                             "SPLITK": 0})
    assert tool.parse_variant("pattern:wsbi") == ("pattern", ("wsbi", tool.parse_launch(
        tool.DEFAULT_PATTERN_LAUNCH)))
    assert tool.parse_variant("pattern:w@r2t64s1")[1] == ("w", {"ROWS": 2, "THREADS": 64,
                                                               "SPLITK": 1})


def test_mma_launches_parse(tool):
    assert tool.parse_variant("mma:t2s8a2b2") == ("mma", {"T": 2, "SIMDS": 8, "ACC": 2,
                                                          "MINBLOCKS": 2})
    assert tool.parse_variant("mma:t1s4") == ("mma", {"T": 1, "SIMDS": 4, "ACC": 1})


@pytest.mark.parametrize("text,match", [
    ("mma:t2", "tTsS"), ("mma:t5s4", "T \\(tiles of 16 rows\\) must be 1 to 4"),
    ("mma:t2s3", "S \\(SIMD-groups\\) must be 1, 2, 4 or 8"),
    ("mma:t2s4a3", "A \\(accumulators per tile\\) must be 1, 2 or 4"),
    ("mma:t2s8b16", "'MINBLOCKS' must be"),
    ("r8t128", "rRtTsS"), ("r8t100s1", "'THREADS' must be a multiple of 32"),
    ("r40t128s0", "'ROWS' must be in"), ("r8t256s1b16", "'MINBLOCKS' must be"),
    ("pattern:ws", "'pattern:' takes one of"), ("fast:r8t128s1", "unknown variant"),
    ("sbi:", "rRtTsS"),
])
def test_bad_variants_are_named(tool, text, match):
    with pytest.raises(ValueError, match=match):
        tool.parse_variant(text)


def test_edits_find_their_text_once(tool):
    """The x-prefetch and half-sum edits apply to the kernel as it is now (a changed one fails
    here, not on the device); an edit whose text is missing or repeated is refused."""
    from mlx_foundry import sources
    from mlx_foundry.stages.gemv import GEMV_SOURCE

    text = (sources._PACKAGE_ROOT / GEMV_SOURCE).read_text()
    edited = tool.apply_edits(text, tool.XPF_EDITS)
    assert edited.count("nux") == 3 and "constexpr bool XPF" in edited
    for edits in (tool.ACP_EDITS, tool.ACQ_EDITS):
        ring = tool.apply_edits(text, edits)
        # The dispatcher takes the ring for one policy and one row of x, else the old path.
        assert ring.count("gemv_dot_rows_acp<P, T, K, ROWS") == 1
        assert ring.count("gemv_dot_rows_h<P, P2, T, K, ROWS") == 1
    fenced = tool.apply_edits(text, tool.FENCE_EDITS)
    # One fence, after the next chunk's loads and before this chunk's x and arithmetic.
    assert fenced.count("simdgroup_barrier(mem_flags::mem_none)") == 1
    assert (fenced.index("nx[r] = pol.load_h(rows[r], cn)")
            < fenced.index("simdgroup_barrier(mem_flags::mem_none)")
            < fenced.index("pol.dot_h(ch[r], xh, xs, key)"))
    from mlx_foundry.policies.affine import AFFINE_HEADER

    affine = (sources._PACKAGE_ROOT / AFFINE_HEADER).read_text()
    assert "const half2 hs" in tool.apply_edits(affine, tool.HSUM_EDITS)
    with pytest.raises(RuntimeError, match="finds its text 0 times"):
        tool.apply_edits(text, [("no such line", "x")])
    with pytest.raises(RuntimeError, match="finds its text 2 times"):
        tool.apply_edits("a\na\n", [("a", "b")])


def test_dry_run_records_every_variant(recorded):
    launch = {name: (r[0].name, r[2]) if r else None for name, r in recorded.items()}
    assert launch["mlx"] is None  # MLX's own op: nothing of ours to record
    assert launch["read"][0] == "read_probe"
    name, kw = launch["op"]
    assert name == "linear_affine_4_64" and kw["ROWS"] == 4 and kw["SPLITK"] == 0
    name, kw = launch["weight"]  # recorded through the full path, the same launch
    assert name == "linear_affine_4_64" and kw["ROWS"] == 4 and kw["w"].shape == (256, 128)
    name, kw = launch["r8t224s1b2"]
    assert name == "linear_affine_4_64" and (kw["THREADS"], kw["MINBLOCKS"]) == (224, 2)
    assert launch["sbi:r8t128s1"][0] == "linear_affine_4_64_sbi"
    assert launch["sbi:r8t128s1"][1]["w_scales"].shape == (256, 2 * 1024 // 64)
    assert launch["xpf:r8t128s1b4"][0] == "linear_affine_4_64_xpf"
    assert launch["xpf:r8t128s1b4"][1]["MINBLOCKS"] == 4
    assert launch["fence:r4t128s1"][0] == "linear_affine_4_64_fence"
    assert launch["acp:r4t128s1"][0] == "linear_affine_4_64_acp"
    assert launch["acq:r8t128s1"][0] == "linear_affine_4_64_acq"
    assert (launch["acq:r8t128s1"][1]["ROWS"], launch["acq:r8t128s1"][1]["SPLITK"]) == (8, 1)
    assert (launch["fence:r4t128s1"][1]["ROWS"], launch["fence:r4t128s1"][1]["SPLITK"]) == (4, 1)
    assert launch["l2p:r8t128s1"][0] == "linear_affine_4_64_l2p"
    assert (launch["l2p:r4t128s0"][1]["ROWS"], launch["l2p:r4t128s0"][1]["SPLITK"]) == (4, 0)
    name, kw = launch["mma:t2s4b4"]
    assert name == "gemv_mma"
    assert (kw["T"], kw["SIMDS"], kw["MINBLOCKS"], kw.get("ACC", 1)) == (2, 4, 4, 1)
    assert launch["mma:t1s2a4"][1]["ACC"] == 4
    kw = launch["pattern:w@r4t256s0"][1]
    assert (kw["ROWS"], kw["SIMDS"], kw["SB"], kw["SPLIT"]) == (4, 8, 0, False)
    assert launch["pattern:wsbi"][1]["SB"] == 2


def test_variant_sources_hold_their_change(recorded):
    sbi = recorded["sbi:r8t128s1"]
    src = sbi[0].source(*sbi[1], **sbi[2])
    assert "struct PolicyAffineSBI" in src.header and "PolicyAffineSBI<" in src.body
    hsum = recorded["hsum:r8t128s1"]
    assert "const half2 hs = (h[0] + h[1])" in hsum[0].source(*hsum[1], **hsum[2]).header
    l2sb = recorded["l2sb:r8t128s1"]
    l2sb_header = l2sb[0].source(*l2sb[1], **l2sb[2]).header
    assert "ch.scale = l2h_load16(scales + g);" in l2sb_header
    assert "uint4 v = q[j];" in l2sb_header  # the weights as before
    l2w = recorded["l2w:r4t128s0"]
    l2w_header = l2w[0].source(*l2w[1], **l2w[2]).header
    assert "uint4 v = l2h_load128(q + j);" in l2w_header
    assert "ch.bias = l2h_load16(biases + g);" in l2w_header
    sbs = recorded["sbs:r4t128s0"]
    sbs_header = sbs[0].source(*sbs[1], **sbs[2]).header
    assert "__shared__ uint4 sbs_st[2 * SBS_UNITS];" in sbs_header
    assert "nx[r] = pol.load_h(rows[r], cn);" not in sbs_header
    xpf = recorded["xpf:r8t128s1b4"]
    assert "constexpr bool XPF" in xpf[0].source(*xpf[1], **xpf[2]).header
    fence = recorded["fence:r4t128s1"]
    fence_header = fence[0].source(*fence[1], **fence[2]).header
    assert "simdgroup_barrier(mem_flags::mem_none)" in fence_header
    assert "constexpr bool XPF" not in fence_header  # each variant its own source
    acp = recorded["acp:r4t128s1"]
    acp_header = acp[0].source(*acp[1], **acp[2]).header
    acq = recorded["acq:r8t128s1"]
    acq_header = acq[0].source(*acq[1], **acq[2]).header
    for h in (acp_header, acq_header):
        assert "cp.async.cg.shared.global" in h and "gemv_dot_rows_acp<" in h
    # x rides in the ring by default; acq loads it in the loop instead.
    assert "#define ACP_X_IN_RING 0" in acq_header and "#define ACP_X_IN_RING 0" not in acp_header
    l2p = recorded["l2p:r8t128s1"]
    l2p_header = l2p[0].source(*l2p[1], **l2p[2]).header
    # One prefetch each of weights, scales and biases, before the first weight loads.
    assert l2p_header.count("l2p_prefetch(pol.") == 3
    assert (l2p_header.index("l2p_prefetch(pol.w")
            < l2p_header.index("ch[r] = pol.load_h(rows[r], c0)"))
    op = recorded["op"]
    header = op[0].source(*op[1], **op[2]).header
    assert "cp.async" not in header and "l2p_prefetch" not in header
    assert "XPF" not in header and "PolicyAffineSBI" not in header  # the package untouched
    assert "simdgroup_barrier(mem_flags::mem_none)" not in header
    assert "const half2 hs" not in header


def _emulated_pattern_sums(w, s, b, rows, simds, split):
    """The pattern kernel's outputs, one lane at a time, from its text's loop."""
    n, full = w.shape[0], w.shape[1] // 4
    w4 = w.reshape(n, full, 4).astype(np.uint64)
    groups = n // rows // (1 if split else simds)
    out = np.zeros(groups * simds, np.uint64)
    for tg in range(groups):
        for sg in range(simds):
            row0 = (tg if split else tg * simds + sg) * rows
            acc = 0
            for lane in range(32):
                c = lane + (32 * sg if split else 0)
                while c < full:
                    for r in range(rows):
                        v = w4[row0 + r, c]
                        acc += int(v[0]) ^ int(v[1]) ^ int(v[2]) ^ int(v[3])
                        g = (row0 + r) * (full // 2) + c // 2
                        acc += int(s.flat[g]) * 3 + int(b.flat[g])
                    c += 32 * (simds if split else 1)
            out[tg * simds + sg] += acc
    return out


@pytest.mark.parametrize("split", [True, False])
def test_pattern_sum_is_the_sum_of_the_kernel_loop(tool, split):
    """pattern_sum, the check every pattern read passes on the device, adds what the
    kernel's loop adds (emulated lane by lane here), whatever the split of the rows."""
    rng = np.random.default_rng(3)
    n, k = 4, 4352  # 136 chunks per row: every lane of every SIMD-group, some twice
    w = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint64).astype(np.uint32)
    s = rng.integers(0, 2**16, size=(n, k // 64), dtype=np.uint16)
    b = rng.integers(0, 2**16, size=(n, k // 64), dtype=np.uint16)
    sbi = np.stack([s, b], axis=-1).reshape(n, -1)
    sums = _emulated_pattern_sums(w, s, b, rows=2 if split else 1, simds=4, split=split)
    want = tool.pattern_sum(mx.array(w), mx.array(s), mx.array(b), mx.array(sbi), 1)
    assert int(sums.sum()) % 2**32 == want
    # Interleaved: the same scale and bias, read as one little-endian word.
    words = s.astype(np.uint64) + (b.astype(np.uint64) << 16)
    wx = tool.pattern_sum(mx.array(w), mx.array(s), mx.array(b), mx.array(sbi), 2)
    w_only = tool.pattern_sum(mx.array(w), mx.array(s), mx.array(b), mx.array(sbi), 0)
    assert wx == (w_only + 2 * int(words.sum())) % 2**32


@pytest.mark.parametrize("name", ["sbi:r8t128s1", "hsum:r8t128s1", "l2sb:r8t128s1",
                                  "l2w:r4t128s0", "sbs:r8t128s1", "sbs:r4t128s0",
                                  "xpf:r8t128s1b4",
                                  "fence:r4t128s1", "acp:r4t128s1", "acq:r8t128s1",
                                  "acp:r4t128s0", "l2p:r8t128s1", "l2p:r4t128s0", "mma:t2s4b4",
                                  "mma:t1s2a4", "pattern:wsb",
                                  "pattern:wsbi"])
def test_variants_compile_for_cuda(recorded, name, tmp_path):
    """Each variant's CUDA unit, as MLX would build it, compiles for sm_90 (nvcc)."""
    from nvrtc_like_mlx import nvcc_compile

    prog, args, kw = recorded[name]
    nvcc_compile(prog, tmp_path / "k.o", "-c", *args, **kw)


def test_cuda_signature_names_uint16_as_mlx_does(recorded):
    """inspection.cuda_source_of writes MLX's CUDA type for every input dtype (the
    pattern read takes uint16 scales): ``dtype_to_cuda_type`` of MLX 0.32."""
    from mlx_foundry.inspection import cuda_source_of

    prog, args, kw = recorded["pattern:wsb"]
    src = cuda_source_of(prog, *args, **kw)
    assert "const uint32_t* w, const uint16_t* s, const uint16_t* b, uint32_t* out" in src


@pytest.mark.parametrize("args,match", [
    (["--shape", "12x"], "must be KxN"), (["--shape", "100x64"], "multiple of the group"),
    (["--shape", "64x0"], "N must be positive"), (["--rounds", "0"], "--rounds must be"),
    (["--chain", "--variants", "read"], "--chain times GEMVs only"),
    (["--chain", "--variants", "op", "pattern:wsb"], "--chain times GEMVs only"),
    (["--chain", "--ncu", "labels.txt"], "--chain times GEMVs only"),
    (["--shape", "1024x264", "--variants", "mma:t1s4"], "N must be a multiple of the 16"),
    (["--shape", "1088x256", "--variants", "mma:t1s4"], "K must be a multiple of 256")])
def test_bad_arguments_are_refused(tool, args, match, capsys):
    with pytest.raises(SystemExit):
        tool.main(["--dry", "--variants", "op", *args])
    assert match in capsys.readouterr().err


def test_chain_wraps_every_variant(tool, monkeypatch):
    """--chain puts every variant's calls through chained() (the dry run, which calls
    each variant once, cannot show the chain itself)."""
    wrapped = []
    real = tool.chained
    monkeypatch.setattr(tool, "chained", lambda fn: wrapped.append(fn) or real(fn))
    got = tool.main(["--dry", "--chain", "--shape", "1024x256", "--variants", "mlx", "op",
                     "r8t128s1", "hsum:r8t128s1"])
    assert len(wrapped) == 4 and set(got) == {"mlx", "op", "r8t128s1", "hsum:r8t128s1"}
    assert got["r8t128s1"] is not None and got["mlx"] is None
    tool.main(["--dry", "--shape", "1024x256", "--variants", "op"])
    assert len(wrapped) == 4  # not without --chain


def test_chained_calls_depend_on_the_call_before(tool):
    """--chain: from the second call on, x (also the x of the launch kwargs) is a new
    array computed from the previous output, equal to the set's x."""
    seen = []

    def fn(x, w, s, b, sbi, kw):
        seen.append((x, kw["x"]))
        return mx.full((1, 3), float(len(seen)), mx.float16)

    run = tool.chained(fn)
    x = mx.arange(5, dtype=mx.float16).reshape(1, 5)
    for _ in range(3):
        run(x, None, None, None, None, {"x": x})
    assert seen[0][0] is x and seen[0][1] is x
    for got, in_kw in seen[1:]:
        assert got is not x and in_kw is got
        assert got.dtype == mx.float16 and np.array_equal(np.array(got), np.array(x))
    # The dependency is real: an infinite first output makes the next x NaN (0 * inf).
    nxt = []
    run2 = tool.chained(lambda x, *rest: nxt.append(x) or mx.full((1, 3), float("inf"),
                                                                   mx.float16))
    run2(x, None, None, None, None, {})
    run2(x, None, None, None, None, {})
    assert not np.isnan(np.array(nxt[0])).any() and np.isnan(np.array(nxt[1])).all()


def _mma_dispatch(x, w, s, b, launch):
    """The mma kernel's dispatch for these arrays (as a launch resolves it), on the CPU."""
    mma = load_tool("gemv_mma")
    prog = mma.mma_kernel()
    bound, given = prog.bind(x, w, s, b, **mma.parse_launch(launch))
    return prog.dispatch_config(bound.with_constants(prog._constants(bound, given)))


def test_mma_dispatch_covers_the_rows():
    k, n = 1024, 96
    w, s, b = (mx.zeros((n, k // 8), mx.uint32), mx.zeros((n, k // 64), mx.float16),
               mx.zeros((n, k // 64), mx.float16))
    x = mx.zeros((1, k), mx.float16)
    cfg = _mma_dispatch(x, w, s, b, "t2s4")
    # 96 rows in threadgroups of 32 (two tiles of 16), four SIMD-groups each.
    assert (cfg.groups, cfg.threads) == ((3, 1, 1), (128, 1, 1))


@pytest.mark.parametrize("shapes,match", [
    (((2, 1024), (96, 128), (96, 16)), "'x' must be one row"),
    (((1, 1024), (96, 64), (96, 16)), "'w' must be \\(N, K / 8\\) = \\(N, 128\\)"),
    (((1, 1024), (96, 128), (96, 8)), "'scales' must be \\(N, K / 64\\) = \\(96, 16\\)"),
    (((1, 1088), (96, 136), (96, 17)), "K must be a multiple of 256"),
    (((1, 1024), (88, 128), (88, 16)), "N must be a multiple of the 32 rows"),
    (((1, 28672), (32, 3584), (32, 448)),
     "K 28672 needs \\d+ bytes of shared memory at this launch, over CUDA's 49152"),
])
def test_mma_dispatch_refuses_what_it_does_not_cover(shapes, match):
    (xs, ws, ss) = shapes
    x, w = mx.zeros(xs, mx.float16), mx.zeros(ws, mx.uint32)
    s = mx.zeros(ss, mx.float16)
    with pytest.raises(ValueError, match=match):
        _mma_dispatch(x, w, s, s, "t2s4")


@pytest.mark.gpu
@pytest.mark.parametrize("k,n,launch", [
    (256, 16, "t1s1"),          # one step, one tile, one SIMD-group
    (768, 48, "t1s4"),          # three steps for four SIMD-groups: one has none
    (1024, 96, "t2s4a2"),
    (4096, 14336, "t2s4b4"),    # the decode shapes at the launches measured
    (14336, 4096, "t2s8a2b2"),
])
def test_mma_variant_matches_quantized_matmul(gpu_backend, k, n, launch):
    """The tensor-core GEMV (tools/gemv_mma.py) against x @ dequantize(w).T in float32 on
    the CPU stream: seeded weights and x, max |ours - want| / max |want| under 4e-3 (f32
    sums; x, the output and the pair sums of x in half). Not mx.quantized_matmul on the
    CPU: with half inputs it is off by 0.6-3.2% of the largest output at these K."""
    if gpu_backend != "cuda":
        pytest.skip("the tensor-core GEMV is CUDA-only text")
    mma = load_tool("gemv_mma")
    mx.random.seed(28)
    x = mx.random.normal((1, k)).astype(mx.float16)
    w, s, b = mx.quantize(mx.random.normal((n, k)) * 0.05, group_size=64, bits=4)
    s, b = s.astype(mx.float16), b.astype(mx.float16)
    got = mma.mma_kernel()(x, w, s, b, backend="cuda", **mma.parse_launch(launch))
    with mx.stream(mx.cpu):
        dense = mx.dequantize(w, s, b, group_size=64, bits=4).astype(mx.float32)
        want = x.astype(mx.float32) @ dense.T
        mx.eval(want)
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.shape == (1, n)
    err = np.abs(got - want).max() / np.abs(want).max()
    worst = int(np.abs(got - want).argmax())
    assert err < 4e-3, (err, worst, got.flat[worst], want.flat[worst])
