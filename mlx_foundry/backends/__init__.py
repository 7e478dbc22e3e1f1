"""Backends: one kernel text, three ways to run it.

* ``metal``: ``mx.fast.metal_kernel`` on Apple silicon;
* ``cuda``: ``mx.fast.cuda_kernel`` with the Metal-compat prelude;
* ``reference``: the descriptor's composition of plain MLX ops.

Selection: an explicit ``backend=`` argument, else ``MLX_FOUNDRY_BACKEND``, else
automatic (metal if Metal is available and the default device is the GPU; cuda
likewise; reference otherwise).
"""

import os

import mlx.core as mx

BACKENDS = ("metal", "cuda", "reference")
ENV_VAR = "MLX_FOUNDRY_BACKEND"

_available = {}


def _probe():
    if not _available:
        _available["metal"] = bool(getattr(mx, "metal", None) and mx.metal.is_available())
        cuda = getattr(mx, "cuda", None)
        _available["cuda"] = bool(cuda and cuda.is_available())
    return _available


class BackendUnavailableError(RuntimeError):
    """A backend that cannot run on this machine was asked for."""


def require_available(backend, who):
    """``backend`` if it can run here, else :class:`BackendUnavailableError` naming it
    (before MLX's own "No ... back-end" at the first launch)."""
    if not is_available(backend):
        raise BackendUnavailableError(
            f"[{who}] Backend {backend!r} is not available on this machine (available: "
            f"{', '.join(b for b in BACKENDS if is_available(b))}).")
    return backend


def is_available(backend):
    """Whether ``backend`` can run here."""
    if backend == "reference":
        return True
    return _probe().get(backend, False)


def gpu_backend():
    """The GPU backend this machine has (``"metal"``, ``"cuda"``) or ``None``."""
    avail = _probe()
    if avail["metal"]:
        return "metal"
    if avail["cuda"]:
        return "cuda"
    return None


def kernel_object(factory, src, **options):
    """``factory`` (``mx.fast.metal_kernel`` / ``cuda_kernel``) applied to a KernelSource."""
    return factory(name=src.name, input_names=list(src.input_names),
                   output_names=list(src.output_names), source=src.body, header=src.header,
                   ensure_row_contiguous=True, **options)


def check_backend(name, who="mlx_foundry"):
    if name not in BACKENDS:
        raise ValueError(f"[{who}] Unknown backend {name!r}. Valid backends are: "
                         f"{', '.join(BACKENDS)}.")
    return name


def select_backend(backend=None, who="mlx_foundry"):
    """Resolve the backend for one call (explicit, then environment, then auto)."""
    if backend is not None:
        return check_backend(backend, who)
    env = os.environ.get(ENV_VAR)
    if env:
        return check_backend(env, f"{who}: {ENV_VAR}")
    gpu = gpu_backend()
    if gpu is not None and mx.default_device() == mx.gpu:
        return gpu
    return "reference"
