"""A custom compound kernel in a few lines: define, print its source, run, check, time.

Fuses ``y = cap * tanh((x + bias[col]) / cap)`` (Gemma-style logit soft-capping after a
bias add) into one kernel made of three inline Metal stages:

    main       load_x    acc = x[i]; index = i; valid = i < n
    epilogue   add_bias  acc += bias[i % N]
    epilogue   softcap   acc = cap * tanh(acc / cap)

then the automatic store ``if (valid) out[index] = T(acc);``.  Runs on the best backend
(metal on Apple silicon, cuda on NVIDIA, else the reference), compares with the
reference made of plain MLX ops, and times it against the same math in MLX ops.

Run it::

    python examples/custom_compound.py            # or paste it into a REPL
    MLX_FOUNDRY_BACKEND=reference python examples/custom_compound.py
"""

import time

import mlx.core as mx
import numpy as np

import mlx_foundry as mf

SRC = """
template <typename T>
METAL_FUNC void load_x(const device T* x, uint n, thread float& acc, thread uint& index,
                       thread bool& valid, uint3 gid) {
  index = gid.x;
  valid = index < n;
  acc = valid ? float(x[index]) : 0.0f;
}
template <typename B, int N>
METAL_FUNC void add_bias(const device B* bias, uint index, thread float& acc) {
  acc += float(bias[index % N]);
}
METAL_FUNC void softcap(float cap, thread float& acc) {
  acc = cap * metal::precise::tanh(acc / cap);
}
"""

x_arg = mf.Tensor("x", (mx.float16, mx.bfloat16, mx.float32))
bias_arg = mf.Tensor("bias", (mx.float16, mx.bfloat16, mx.float32), ndim=1)

load_x = mf.Stage(
    "load_x", function="load_x", source_text=SRC, template=("T",),
    args=[x_arg, mf.Scalar("n", mf.u32), mf.Constant("T", "dtype", like="x")],
    produces={"acc": "float", "index": "uint", "valid": "bool"},
    attributes=("thread_position_in_grid",),
    reference=lambda b, v: {"acc": b.x.astype(mx.float32)})
add_bias = mf.Stage(
    "add_bias", function="add_bias", template=("B", "N"),
    args=[bias_arg, mf.Constant("B", "dtype", like="bias"),
          mf.Constant("N", value=lambda b: b.bias.shape[0])],
    consumes={"acc": "float", "index": "uint"}, produces={"acc": "float"},
    reference=lambda b, v: {"acc": v["acc"] + b.bias.astype(mx.float32)})
softcap = mf.Stage(
    "softcap", function="softcap", args=[mf.Scalar("cap", mf.f32)],
    consumes={"acc": "float"}, produces={"acc": "float"},
    reference=lambda b, v: {"acc": b.cap * mx.tanh(v["acc"] / b.cap)})

bias_softcap = mf.CompoundKernel(
    "bias_softcap", main=load_x, epilogues=[add_bias, softcap],
    outputs=[mf.Output("out", shape=lambda b: b.x.shape, dtype="x")],
    dispatch=lambda b: mf.per_element(b.x.size))


def mlx_ops(x, bias, cap):
    """The same math in plain MLX ops (the unfused baseline)."""
    return (cap * mx.tanh((x.astype(mx.float32) + bias.astype(mx.float32)) / cap)).astype(x.dtype)


def timeit(fn, iters=50, repeats=10):
    """Median seconds per call: ``iters`` calls evaluated together, ``repeats`` times."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(iters)])
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times))


def main():
    mx.random.seed(0)
    rows, cols, cap = 33, 1000, 30.0          # not multiples of 4, 32 or the threadgroup
    x = (40 * mx.random.normal((rows, cols))).astype(mx.float16)
    bias = mx.random.normal((cols,)).astype(mx.float16)
    args = dict(x=x, bias=bias, n=x.size, cap=cap)   # inputs by name

    print(bias_softcap.source(backend="metal", **args))     # generated header + body
    backend = mf.select_backend()
    print(f"backend: {backend}")

    out = bias_softcap(backend=backend, **args)
    ref = bias_softcap(backend="reference", **args)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(ref.astype(mx.float32)),
                               rtol=1e-2, atol=1e-2)                 # float16 tolerance
    np.testing.assert_allclose(np.array(ref.astype(mx.float32)),
                               np.array(mlx_ops(x, bias, cap).astype(mx.float32)),
                               rtol=1e-2, atol=1e-2)
    if backend == "reference":
        # No kernel ran: the check above is the reference against MLX's own ops.
        print("reference backend (no GPU here): the reference matches MLX's ops; no kernel ran")
    else:
        print(f"matches the reference (max |diff| "
              f"{mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max().item():.2e})")

    fused = timeit(lambda: bias_softcap(backend=backend, **args))
    plain = timeit(lambda: mlx_ops(x, bias, cap))
    print(f"fused ({backend}): {fused * 1e6:.1f} us/call; MLX ops: {plain * 1e6:.1f} us/call "
          f"({plain / fused:.2f}x) on {mx.default_device()}")
    return out


if __name__ == "__main__":
    main()
