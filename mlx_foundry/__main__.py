"""Command line: ``python -m mlx_foundry {demo,show,check,bench}``."""

import argparse
import sys


def _demo(args):
    from .backends import BackendUnavailableError
    from .demo import run_demo

    try:
        return run_demo(backend=args.backend, show_source=not args.quiet)
    except BackendUnavailableError as e:
        print(e, file=sys.stderr)
        return 2


def _show(args):
    from . import catalog

    if args.list or not args.kernel:
        for entry in catalog.entries():
            print(f"{entry.name:40s} {entry.description}")
        return 0
    try:
        entry = catalog.get(args.kernel)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    program, a, kw = entry.build()
    if args.backend == "metal-full":
        print(program.metal_source(*a, **kw))
    else:
        print(program.source(*a, backend=args.backend, **kw))
    return 0


def _check(args):
    from . import catalog
    from .metal_check import run_check

    sources = []
    for entry in catalog.entries():
        if args.kernel and not any(k in entry.name for k in args.kernel):
            continue
        program, a, kw = entry.build()
        sources.append((entry.name, program.metal_source(*a, **kw)))
    if not sources:
        # A filter that matches nothing must not pass a CI step silently.
        print(f"[check] No catalog kernel matches {' '.join(args.kernel)!r} (see "
              f"'show --list').", file=sys.stderr)
        return 2
    return run_check(sources)


def _bench(args):
    if args.tune:
        if getattr(args, "dtype", None) not in (None, "float16"):
            print("[bench] --tune tunes the float16 kernels; --dtype "
                  f"{args.dtype} is not supported with it.", file=sys.stderr)
            return 2
        from .bench.autotune import tune_decode, tune_linear

        chosen = tune_linear(args.backend, rows_of_x=tuple(args.tune_rows))
        chosen.update(tune_decode(args.backend))
        for (key, shape_class), params in chosen.items():
            print(f"{key:60s} {shape_class:24s} {params}")
        return 0
    from .bench import main as bench_main

    return bench_main(args)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_foundry",
                                description="mlx_foundry: fused GPU kernels for MLX.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build a compound kernel, show it, run it, check it, time it")
    d.add_argument("--backend", choices=["metal", "cuda", "reference"], default=None)
    d.add_argument("--quiet", action="store_true", help="do not print the generated source")
    d.set_defaults(fn=_demo)

    s = sub.add_parser("show", help="print the generated source of a catalog kernel")
    s.add_argument("kernel", nargs="?", help="catalog name (see --list)")
    s.add_argument("--list", action="store_true")
    s.add_argument("--backend", choices=["metal", "cuda", "metal-full"], default="metal-full",
                   help="metal/cuda: header + body; metal-full: the whole source MLX compiles")
    s.set_defaults(fn=_show)

    c = sub.add_parser("check", help="check every catalog kernel with a Metal front-end")
    c.add_argument("kernel", nargs="*", help="only catalog names containing these strings")
    c.set_defaults(fn=_check)

    b = sub.add_parser("bench", help="benchmark fused ops against MLX")
    b.add_argument("--quick", action="store_true", help="a short run")
    b.add_argument("--out", default=None, help="directory for results.json and chart.png")
    b.add_argument("--only", nargs="*", default=None, help="only cases containing these strings")
    b.add_argument("--backend", choices=["metal", "cuda", "reference"], default=None)
    b.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="activation and scale dtype (default: float16; float32 at the "
                        "reference backend's tiny shapes)")
    b.add_argument("--tune", action="store_true",
                   help="tune the GEMV launch constants for this device and store them")
    b.add_argument("--tune-rows", nargs="+", type=int, default=[1], metavar="M",
                   help="with --tune: rows of x to tune linear for (several rows also tune "
                        "MBLOCK; default: 1)")
    b.set_defaults(fn=_bench)

    args = p.parse_args(argv)
    return args.fn(args) or 0


def _run():
    try:
        return main()
    except BrokenPipeError:
        # The reader went away (``show --list | head``): not an error of ours. Point
        # stdout at devnull so that Python's flush at exit does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(_run())
