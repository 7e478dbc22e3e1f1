"""Front-end check of generated Metal source, on any machine (no Mac needed).

The full Metal source that MLX would compile for a kernel (the signature MLX
writes, our header and body, the explicit instantiation) is parsed by clang
(libclang from PyPI, ``pip install mlx-kernel-foundry[check]``) in C++17 mode
against a declaration-only stub of Metal's standard library and of the prefix
MLX prepends (``mlx_foundry/metal_src/check/``). The stub gives clang Metal's
rules where clang can enforce them:

* address spaces ``device`` / ``constant`` / ``threadgroup`` / ``thread`` are
  distinct clang address spaces: a pointer never converts between them;
* Metal's scalar and vector types (ext_vector types: ``.x``, ``.xy``, vector
  arithmetic), and Metal's constructor syntax ``float4(a, b, c, d)``;
* the metal_stdlib functions with their specification signatures
  (``metal::``, ``fast::``, ``precise::`` math, SIMD-group functions,
  barriers, atomics, ``as_type``) and nothing else: CUDA names such as
  ``__shfl_xor_sync``, ``threadIdx`` or ``__half`` are undeclared;
* templates, instantiated exactly as MLX instantiates the kernel.

A few Metal spellings that clang does not parse are rewritten before parsing,
keeping line numbers (and mapping columns back): Metal attributes
(``[[kernel]]``, ``[[buffer(0)]]``, ``[[thread_position_in_grid]]``, ...) are
validated against the specification's list and removed; ``float4(...)``
constructor calls become ``__metal_vector_ctor<float4>(...)``; threadgroup
variables in a kernel body become function-static threadgroup variables;
``1.0h`` half literals become ``1.0f16``; address-space qualifiers on member
functions are dropped (see ``LIMITATIONS``).

Entry points: :func:`check_source`, :func:`check_sources`,
:func:`format_diagnostics`, :func:`run_check` (the ``check`` command) and
:func:`metal_source_from_export` (the generated sources of every Metal kernel
a function calls, captured from MLX's verbose output under
``mx.export_function``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

__all__ = [
    "Diagnostic",
    "MetalCheckUnavailable",
    "LIMITATIONS",
    "STUB_DIR",
    "check_source",
    "check_sources",
    "format_diagnostics",
    "run_check",
    "metal_source_from_export",
    "parse_verbose_output",
    "verbose_metal_kernels",
    "libclang_available",
]

STUB_DIR = Path(__file__).resolve().parent / "metal_src" / "check"
PRELUDE = "mlx_utils.h"  # what MLX prepends (metal::utils()); includes metal_stdlib.h

INSTALL_HINT = (
    "the Metal front-end check needs libclang: "
    "pip install 'mlx-kernel-foundry[check]'   (or: pip install 'libclang>=18.1')"
)

LIMITATIONS = """\
What the check cannot see (it is clang's C++ front-end with a Metal stub, not Apple's
Metal compiler):
- Back-end and resource limits: register pressure, threadgroup memory over 32 KiB,
  threads per threadgroup, buffer index limits, argument-buffer rules.
- Metal-only language rules clang does not implement: recursion, function pointers,
  virtual functions, goto, dynamic allocation are not rejected; program-scope variables
  outside the constant address space are not rejected; kernel parameter rules
  (types allowed per attribute) are not checked.
- Vector comparisons give integer vectors (clang/OpenCL semantics) where Metal gives
  bool vectors: `bool4 m = a > b;` is reported although Metal accepts it; write
  `select`/`all`/`any` on the comparison directly.
- Member functions are modelled as `thread` member functions: an address-space
  qualifier after a member function (`int f() const constant`) is dropped, so calling
  it on a `constant`/`device` object is reported.
- Arrays declared with an address space as function parameters
  (`constant int x[3]`) are rejected by clang; write a pointer.
- Overload sets follow the specification, but mixed-type calls that Apple's headers
  resolve with internal templates may resolve differently (ambiguities reported here
  can be accepted by Metal and vice versa in rare mixed half/float/bfloat cases).
- Runtime behaviour: out-of-bounds access, races, SIMD divergence.
"""


class MetalCheckUnavailable(RuntimeError):
    """libclang (the PyPI ``libclang`` package) is not installed or cannot load."""


@dataclasses.dataclass(frozen=True)
class Diagnostic:
    """One finding, located in the generated Metal source of one kernel."""

    kernel: str
    line: int  # 1-based line in the generated source (0: not in the source)
    column: int  # 1-based column in the generated source (0: unknown)
    severity: str  # "error" | "warning"
    message: str
    source_line: str = ""  # the offending line of the generated source
    notes: tuple[str, ...] = ()

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        return format_diagnostics([self])


# --------------------------------------------------------------------------------------
# libclang loading
# --------------------------------------------------------------------------------------

_INDEX = None
_INDEX_LOCK = threading.Lock()


def _cindex():
    try:
        import clang.cindex as ci  # type: ignore
    except ImportError as e:  # pragma: no cover - exercised without libclang
        raise MetalCheckUnavailable(INSTALL_HINT) from e
    return ci


def _index():
    global _INDEX
    with _INDEX_LOCK:
        if _INDEX is None:
            ci = _cindex()
            try:
                _INDEX = ci.Index.create()
            except Exception as e:  # LibclangError: bindings without the shared library
                raise MetalCheckUnavailable(f"{INSTALL_HINT} ({e})") from e
            # Dispose of the index before interpreter teardown: libclang's bindings
            # cannot free it once their module globals are gone (a noisy __del__).
            atexit.register(_dispose_index)
        return _INDEX


def _dispose_index():
    global _INDEX
    with _INDEX_LOCK:
        _INDEX = None


def libclang_available() -> bool:
    """True when the check can run (libclang importable and loadable)."""
    try:
        _index()
        return True
    except MetalCheckUnavailable:
        return False


# --------------------------------------------------------------------------------------
# Source preparation: Metal spellings clang does not parse, rewritten line-preservingly
# --------------------------------------------------------------------------------------

# MSL specification, "Attributes": function, argument and built-in attributes.
METAL_ATTRIBUTES = frozenset(
    """
    kernel vertex fragment visible stitchable object mesh intersection
    host_name buffer texture sampler threadgroup function_constant id user
    max_total_threads_per_threadgroup required_threads_per_threadgroup
    early_fragment_tests patch position stage_in payload attribute color
    raster_order_group index primitive_culled point_size clip_distance
    render_target_array_index viewport_array_index sample_id sample_mask
    front_facing point_coord barycentric_coord center_perspective
    center_no_perspective centroid_perspective centroid_no_perspective
    sample_perspective sample_no_perspective flat amplification_id
    amplification_count vertex_id instance_id base_vertex base_instance
    depth invariant shared
    thread_position_in_grid thread_position_in_threadgroup
    thread_index_in_threadgroup threadgroup_position_in_grid threads_per_grid
    threads_per_threadgroup threadgroups_per_grid dispatch_threads_per_threadgroup
    thread_index_in_simdgroup thread_execution_width threads_per_simdgroup
    simdgroup_index_in_threadgroup simdgroups_per_threadgroup
    dispatch_simdgroups_per_threadgroup quadgroup_index_in_threadgroup
    thread_index_in_quadgroup quadgroups_per_threadgroup
    dispatch_quadgroups_per_threadgroup grid_origin grid_size
    mesh_grid_properties object_data
    """.split()
)
STANDARD_ATTRIBUTES = frozenset(
    """
    noreturn carries_dependency deprecated fallthrough nodiscard maybe_unused
    likely unlikely no_unique_address
    """.split()
)
_KERNEL_ATTRIBUTES = {"kernel", "vertex", "fragment", "object", "mesh"}
_ADDRESS_SPACES = {
    "device",
    "constant",
    "threadgroup",
    "thread",
    "threadgroup_imageblock",
    "ray_data",
    "object_data",
}
_VECTOR_TYPE = re.compile(
    r"(?:packed_)?(?:bool|char|uchar|short|ushort|int|uint|long|ulong|half|float|bfloat)[234]"
)
_HALF_LITERAL = re.compile(r"(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][+-]?\d+)?[hH]")

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\f\v]+|\\\n)
  | (?P<nl>\n)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<str>(?:u8|u|U|L)?"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
  | (?P<num>\.?[0-9](?:[eEpP][+-]|[A-Za-z0-9_.'])*)
  | (?P<id>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<punct>::|->|<<=|>>=|\#\#|[-+*/%&|^!=<>]=|&&|\|\||\+\+|--|.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclasses.dataclass
class _Tok:
    kind: str
    text: str
    start: int
    end: int
    directive: bool


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    at_line_start = True
    in_directive = False
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "nl":
            at_line_start, in_directive = True, False
            continue
        if kind == "ws":
            continue
        if kind == "comment":
            if "\n" in m.group() and not in_directive:
                at_line_start = True
            continue
        if kind == "punct" and m.group() == "#" and at_line_start:
            in_directive = True
        at_line_start = False
        toks.append(_Tok(kind, m.group(), m.start(), m.end(), in_directive))
    return toks


@dataclasses.dataclass
class _Prepared:
    text: str
    # per line (1-based): list of (orig_col0, orig_len, new_len) for length-changing edits
    shifts: dict[int, list[tuple[int, int, int]]]
    findings: list[tuple[int, str]]  # (offset in original text, message): checker errors

    def map_column(self, line: int, col: int) -> int:
        """Column (1-based) in the rewritten text -> column in the original text."""
        shift = 0
        for orig0, olen, nlen in self.shifts.get(line, ()):
            new0 = orig0 + shift
            if col - 1 < new0:
                break
            if col - 1 < new0 + nlen:
                return orig0 + 1
            shift += nlen - olen
        return col - shift


def _matching(toks: list[_Tok], i: int, open_: str, close: str) -> int:
    """Index of the token closing toks[i] (== open_), or -1."""
    depth = 0
    for j in range(i, len(toks)):
        t = toks[j].text
        if t == open_:
            depth += 1
        elif t == close:
            depth -= 1
            if depth == 0:
                return j
        elif t in (";", "{", "}") and open_ == "<":
            return -1
    return -1


def _prepare(source: str) -> _Prepared:
    toks = _tokenize(source)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in the original text
    findings: list[tuple[int, str]] = []

    def blank(start: int, end: int) -> None:
        edits.append((start, end, re.sub(r"[^\n]", " ", source[start:end])))

    # block stack entries: (kind, is_kernel) with kind in {"decl", "code", "init"}
    stack: list[tuple[str, bool]] = [("decl", False)]
    pending_kernel = False
    paren = 0
    i = 0
    n = len(toks)

    def prev_sig(k: int) -> _Tok | None:
        k -= 1
        while k >= 0 and toks[k].directive:
            k -= 1
        return toks[k] if k >= 0 else None

    def next_tok(k: int) -> _Tok | None:
        return toks[k + 1] if k + 1 < n else None

    while i < n:
        t = toks[i]
        nxt = next_tok(i)

        # ---- [[ attribute-list ]] ----------------------------------------------------
        if t.text == "[" and nxt is not None and nxt.text == "[" and nxt.start == t.end:
            depth, j = 0, i + 2
            close = -1
            while j < n:
                tj = toks[j].text
                if tj in "([{" and len(tj) == 1:
                    depth += 1
                elif tj in ")}" and len(tj) == 1:
                    depth -= 1
                elif tj == "]":
                    if depth == 0 and j + 1 < n and toks[j + 1].text == "]":
                        close = j + 1
                        break
                    depth -= 1
                j += 1
            if close > 0:
                # split the attribute list at top-level commas
                names: list[tuple[str, int]] = []
                depth, expect_name = 0, True
                for k in range(i + 2, close - 1):
                    tk = toks[k]
                    if tk.text in ("(", "["):
                        depth += 1
                    elif tk.text in (")", "]"):
                        depth -= 1
                    elif depth == 0 and tk.text == ",":
                        expect_name = True
                    elif depth == 0 and expect_name and tk.kind == "id":
                        if k + 1 < close and toks[k + 1].text == "::":
                            names.append((tk.text + "::" + toks[k + 2].text, tk.start))
                        else:
                            names.append((tk.text, tk.start))
                        expect_name = False
                standard = [nm for nm, _ in names if nm in STANDARD_ATTRIBUTES or "::" in nm]
                for nm, pos in names:
                    if nm in _KERNEL_ATTRIBUTES:
                        pending_kernel = True
                    if nm not in METAL_ATTRIBUTES and nm not in STANDARD_ATTRIBUTES and "::" not in nm:
                        findings.append((pos, f"unknown attribute '{nm}': not a Metal attribute"))
                if len(standard) != len(names) or not names:
                    blank(t.start, toks[close].end)
                i = close + 1
                continue

        if not t.directive:
            p = prev_sig(i)
            ptext = p.text if p is not None else ";"
            # ---- structure: which braces open code blocks, and of which function ----
            if t.text == "{":
                parent_kind, parent_kernel = stack[-1]
                if parent_kind == "init":
                    kind = "init"
                elif ptext in (")", "]", "else", "do", "try", "mutable", "noexcept", "const",
                               "volatile", "override", "final") or ptext in _ADDRESS_SPACES:
                    kind = "code" if not (ptext == "final" and parent_kind == "decl") else "decl"
                elif parent_kind == "code":
                    kind = "code" if ptext in (";", "{", "}", ":") else "init"
                elif ptext == "=" or ptext == ",":
                    kind = "init"
                else:
                    kind = "decl"
                if kind == "code" and parent_kind == "decl":
                    stack.append(("code", pending_kernel))  # a function body
                    pending_kernel = False
                else:
                    stack.append((kind, parent_kernel))
            elif t.text == "}":
                if len(stack) > 1:
                    stack.pop()
            elif t.text == "(":
                paren += 1
            elif t.text == ")":
                paren = max(0, paren - 1)
            elif t.text == ";" and stack[-1][0] == "decl" and paren == 0:
                pending_kernel = False

            # ---- `kernel void f(...)` function qualifier -----------------------------
            if (t.kind == "id" and t.text in _KERNEL_ATTRIBUTES and nxt is not None
                    and nxt.text == "void" and ptext not in (".", "->", "::")):
                pending_kernel = True
                blank(t.start, t.end)
                i += 1
                continue

            # ---- address-space qualifier of a member function: `int f() const constant {`
            if t.kind == "id" and t.text in _ADDRESS_SPACES and t.text != "thread":
                k = i - 1
                while k >= 0 and toks[k].text in ("const", "volatile"):
                    k -= 1
                if (k >= 0 and toks[k].text == ")" and nxt is not None and nxt.text in
                        ("{", ";", ":", "=", "->", "noexcept", "const", "override", "final")):
                    blank(t.start, t.end)
                    i += 1
                    continue

            # ---- a threadgroup variable declared in a function body ------------------
            if t.text == "threadgroup" and stack[-1][0] == "code" and paren == 0:
                k = i - 1
                saw_static = False
                while k >= 0 and toks[k].text in ("const", "volatile", "constexpr", "static"):
                    saw_static = saw_static or toks[k].text == "static"
                    k -= 1
                at_stmt_start = k < 0 or toks[k].text in (";", "{", "}")
                if at_stmt_start and not saw_static:
                    # skip the type (identifiers, ::, template arguments, cv) to the declarator
                    j = i + 1
                    while j < n:
                        tj = toks[j]
                        if tj.kind == "id" or tj.text == "::":
                            j += 1
                        elif tj.text == "<":
                            m_ = _matching(toks, j, "<", ">")
                            if m_ < 0:
                                break
                            j = m_ + 1
                        else:
                            break
                    is_pointer = j < n and toks[j].text in ("*", "&", "&&")
                    if not is_pointer:
                        # the last identifier before j is the variable name
                        if not stack[-1][1]:
                            findings.append((
                                t.start,
                                "threadgroup variable declared outside a kernel function "
                                "(declare it in the kernel body and pass a pointer)",
                            ))
                        edits.append((t.start, t.end, "__mtl_tgvar"))  # same length
                        i += 1
                        continue

        # ---- Metal vector constructors: float4(a, b), vec<T, 4>(x) ------------------------
        if t.kind == "id" and nxt is not None:
            p = prev_sig(i)
            ptext = p.text if p is not None else ""
            if ptext not in (".", "->"):
                if _VECTOR_TYPE.fullmatch(t.text) and nxt.text == "(":
                    edits.append((t.start, t.end, f"__metal_vector_ctor<{t.text}>"))
                    i += 1
                    continue
                if t.text in ("vec", "packed_vec") and nxt.text == "<":
                    close = _matching(toks, i + 1, "<", ">")
                    if close > 0 and close + 1 < n and toks[close + 1].text == "(":
                        edits.append((t.start, t.start, "__metal_vector_ctor<"))
                        edits.append((toks[close].end, toks[close].end, ">"))
                        i = close + 1
                        continue

        # ---- half literals: 1.0h -> 1.0f16 ----------------------------------------------
        if t.kind == "num" and _HALF_LITERAL.fullmatch(t.text):
            edits.append((t.end - 1, t.end, "f16"))

        i += 1

    # apply the edits (sorted, non-overlapping by construction)
    edits.sort(key=lambda e: (e[0], e[1]))
    out: list[str] = []
    shifts: dict[int, list[tuple[int, int, int]]] = {}
    pos = 0
    line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
    import bisect

    for start, end, rep in edits:
        if start < pos:
            continue
        out.append(source[pos:start])
        out.append(rep)
        pos = end
        if len(rep) != end - start:
            line = bisect.bisect_right(line_starts, start)
            col0 = start - line_starts[line - 1]
            shifts.setdefault(line, []).append((col0, end - start, len(rep)))
    out.append(source[pos:])
    return _Prepared("".join(out), shifts, findings)


# --------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------

_CLANG_ARGS = [
    "-x", "c++",
    "-std=c++17",  # Metal 3 is based on C++17
    "--target=aarch64-apple-macos",  # 64-bit long/size_t, _Float16 and __bf16 arithmetic
    "-nostdinc",
    "-nostdinc++",
    "-fno-exceptions",
    "-fno-rtti",
    "-ferror-limit=100",
    "-Werror=unknown-attributes",
    "-Wno-unused-value",
]

_NOISE = (
    "argument unused during compilation",
)


def _kernel_file_name(kernel_name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", kernel_name) or "kernel"
    return f"/__mlx_foundry_check__/{safe}.metal"


def _clean_message(msg: str) -> str:
    msg = re.sub(r"__metal_vector_ctor<([^<>,]*(?:<[^<>]*>)?)(?:, [^<>]*)?>", r"\1", msg)
    msg = msg.replace("__metal_vector_ctor", "vector constructor")
    msg = msg.replace("__metal_has_no_double_type", "double (Metal has no double)")
    msg = re.sub(r"\b_Float16\b", "half", msg)
    msg = re.sub(r"\b__bf16\b", "bfloat", msg)
    return msg


def check_source(source: str, *, kernel_name: str, extra_args: Sequence[str] = ()) -> list[Diagnostic]:
    """Check one full generated Metal source (as MLX would compile it, without
    MLX's prefix, which the stub supplies). Returns errors and warnings, located
    in ``source`` (line 1 = first line of ``source``)."""
    ci = _cindex()
    index = _index()
    prepared = _prepare(source)
    lines = source.splitlines()

    def src_line(line: int) -> str:
        return lines[line - 1] if 0 < line <= len(lines) else ""

    diags: list[Diagnostic] = []
    for offset, msg in prepared.findings:
        line = source.count("\n", 0, offset) + 1
        col = offset - (source.rfind("\n", 0, offset) + 1) + 1
        diags.append(Diagnostic(kernel_name, line, col, "error", msg, src_line(line)))

    fname = _kernel_file_name(kernel_name)
    args = list(_CLANG_ARGS) + [f"-I{STUB_DIR}", "-include", str(STUB_DIR / PRELUDE)]
    args += list(extra_args)
    tu = index.parse(fname, args=args, unsaved_files=[(fname, prepared.text)], options=0)

    def in_main(loc) -> bool:
        return loc.file is not None and loc.file.name == fname

    for d in tu.diagnostics:
        if d.severity < ci.Diagnostic.Warning:
            continue
        severity = "error" if d.severity >= ci.Diagnostic.Error else "warning"
        message = _clean_message(d.spelling)
        if any(s in message for s in _NOISE):
            continue
        notes: list[str] = []
        loc = d.location
        if in_main(loc):
            line, col = loc.line, prepared.map_column(loc.line, loc.column)
        else:
            # inside the stub (e.g. a static_assert of a stub template): report it at the
            # first line of the kernel source that led there
            line = col = 0
            where = f"{Path(loc.file.name).name}:{loc.line}" if loc.file is not None else ""
            for child in d.children:
                if in_main(child.location):
                    line = child.location.line
                    col = prepared.map_column(line, child.location.column)
                    break
            if where:
                notes.append(f"(reported in the Metal stub at {where})")
        arity = [c.spelling for c in d.children
                 if re.search(r"requires (?:single argument|\d+ arguments?)\b.*, but \d+ (?:arguments? )?(?:was|were) provided", c.spelling)]
        if arity:
            notes.append(_clean_message(arity[0]))
        for child in d.children:
            if in_main(child.location) and child.location.line != line:
                notes.append(
                    f"line {child.location.line}: {_clean_message(child.spelling)}"
                )
        if "cannot initialize object parameter" in message:
            notes.append(
                "(the checker models member functions as `thread` member functions; "
                "see LIMITATIONS)"
            )
        diags.append(
            Diagnostic(kernel_name, line, col, severity, message, src_line(line), tuple(notes[:4]))
        )
    diags.sort(key=lambda x: (x.severity != "error", x.line, x.column))
    return diags


def check_sources(sources: Iterable[tuple[str, str]]) -> list[Diagnostic]:
    """Check several ``(kernel name, generated source)`` pairs."""
    out: list[Diagnostic] = []
    for name, src in sources:
        out.extend(check_source(src, kernel_name=name))
    return out


def format_diagnostics(diags: Sequence[Diagnostic], *, show_warnings: bool = True) -> str:
    """Compiler-style text: ``kernel:line:col: error: message``, the line, a caret."""
    parts: list[str] = []
    for d in diags:
        if d.severity != "error" and not show_warnings:
            continue
        head = f"{d.kernel}:{d.line}:{d.column}: {d.severity}: {d.message}"
        parts.append(head)
        if d.source_line:
            text = d.source_line.expandtabs(4) if "\t" not in d.source_line else d.source_line
            parts.append(f"  {d.line:5d} | {text}")
            if d.column > 0:
                pad = "".join(c if c == "\t" else " " for c in d.source_line[: d.column - 1])
                parts.append(f"        | {pad}^")
        for note in d.notes:
            parts.append(f"        note: {note}")
    return "\n".join(parts)


def run_check(sources: Sequence[tuple[str, str]], *, file=None, show_warnings: bool = True) -> int:
    """The ``check`` command: check every ``(name, source)``, print the findings
    and a summary. Returns the exit code: 0 clean, 1 errors found, 2 cannot run."""
    file = file or sys.stdout
    try:
        _index()
    except MetalCheckUnavailable as e:
        print(f"mlx_foundry check: {e}", file=sys.stderr)
        return 2
    n_err = n_warn = 0
    failed: list[str] = []
    for name, src in sources:
        t0 = time.perf_counter()
        diags = check_source(src, kernel_name=name)
        ms = (time.perf_counter() - t0) * 1e3
        errs = sum(d.is_error for d in diags)
        warns = len(diags) - errs
        n_err += errs
        n_warn += warns
        status = "ok" if errs == 0 else "FAILED"
        extra = f", {errs} error(s)" if errs else ""
        extra += f", {warns} warning(s)" if warns else ""
        print(f"[{status}] {name} ({src.count(chr(10)) + 1} lines, {ms:.0f} ms{extra})", file=file)
        if errs or (warns and show_warnings):
            print(format_diagnostics(diags, show_warnings=show_warnings), file=file)
        if errs:
            failed.append(name)
    total = len(sources)
    print(
        f"checked {total} kernel(s): {total - len(failed)} passed, {len(failed)} failed"
        f" ({n_err} error(s), {n_warn} warning(s))",
        file=file,
    )
    return 1 if failed else 0


# --------------------------------------------------------------------------------------
# Getting the generated source out of MLX (no Metal needed)
# --------------------------------------------------------------------------------------

_GENERATED = re.compile(r"Generated source code for `([^`]*)`:\n```\n(.*?)\n```", re.DOTALL)


def parse_verbose_output(text: str) -> list[tuple[str, str]]:
    """``(name, source)`` for every kernel source MLX printed with ``verbose=True``
    (duplicates removed, order kept)."""
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str]] = []
    for m in _GENERATED.finditer(text):
        item = (m.group(1), m.group(2) + "\n")
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


@contextlib.contextmanager
def _capture_fd(fd: int = 1) -> Iterator[list[str]]:
    """Capture everything written to file descriptor ``fd`` (C++ std::cout included)."""
    result: list[str] = []
    for stream in (sys.stdout, sys.__stdout__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield result
        finally:
            with contextlib.suppress(Exception):
                import ctypes

                ctypes.CDLL(None).fflush(None)
            for stream in (sys.stdout, sys.__stdout__):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            result.append(tmp.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def verbose_metal_kernels() -> Iterator[None]:
    """Inside this block, every kernel made by ``mx.fast.metal_kernel`` prints its
    generated source when called (``verbose=True`` is forced), and
    ``mx.metal.is_available()`` reads True so that code which only builds its Metal
    kernels on Apple hardware (e.g. mlx-lm's) builds them here too. Kernels made
    before the block keep their own ``verbose`` argument."""
    import mlx.core as mx

    orig_kernel = mx.fast.metal_kernel
    orig_available = mx.metal.is_available

    def metal_kernel(*args, **kwargs):
        kernel = orig_kernel(*args, **kwargs)

        def call(*cargs, **ckwargs):
            ckwargs["verbose"] = True
            return kernel(*cargs, **ckwargs)

        call.__wrapped__ = kernel  # type: ignore[attr-defined]
        return call

    mx.fast.metal_kernel = metal_kernel
    mx.metal.is_available = lambda: True
    try:
        yield
    finally:
        mx.fast.metal_kernel = orig_kernel
        mx.metal.is_available = orig_available


def metal_source_from_export(fn: Callable, *example_inputs, **example_kwargs) -> list[tuple[str, str]]:
    """Trace ``fn(*example_inputs)`` with ``mx.export_function`` and return
    ``(kernel name, generated Metal source)`` for every Metal kernel it calls.

    The kernels must be called with ``verbose=True`` (pass it, or make them inside
    :func:`verbose_metal_kernels`); MLX then prints the full source it would compile
    to C++ stdout, which is captured at the file-descriptor level. Works on Linux
    without Metal: under export tracing nothing is compiled or run. The returned
    source lacks only MLX's prefix (``metal::utils()``), which :func:`check_source`
    supplies from its stub."""
    import mlx.core as mx

    def traced(*args, **kwargs):
        # export_function wants arrays out: keep the arrays of any output structure
        out, stack = [], [fn(*args, **kwargs)]
        while stack:
            x = stack.pop(0)
            if isinstance(x, mx.array):
                out.append(x)
            elif isinstance(x, (list, tuple)):
                stack[:0] = list(x)
            elif isinstance(x, dict):
                stack[:0] = list(x.values())
        return out or [mx.array(0)]

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.mlxfn")
        error = None
        with _capture_fd(1) as captured:
            try:
                mx.export_function(path, traced, *example_inputs, **example_kwargs)
            except Exception as e:  # e.g. a primitive export cannot serialize
                error = e
    sources = parse_verbose_output(captured[0] if captured else "")
    if error is not None and not sources:
        raise error
    # an export error after the kernels were traced (serialization) does not matter here
    return sources
