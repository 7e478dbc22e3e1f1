import warnings

import pytest

from mlx_foundry import sources


@pytest.fixture
def root(tmp_path):
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "a.metal").write_text("// a\nMETAL_FUNC int a() { return 1; }\n")
    (tmp_path / "utils" / "b.metal").write_text(
        '#include "utils/a.metal"\n#include <metal_stdlib>\nMETAL_FUNC int b() { return a(); }\n')
    (tmp_path / "c.metal").write_text('#include "utils/b.metal"\nint c;\n')
    (tmp_path / "cyc1.metal").write_text('#include "cyc2.metal"\n')
    (tmp_path / "cyc2.metal").write_text('#include "cyc1.metal"\n')
    (tmp_path / "asks.metal").write_text('#include "nope.metal"\n')
    sources.add_source_root(tmp_path)
    return tmp_path


def test_resolution_is_ordered_and_deduplicated(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sources.resolve(["c.metal", "utils/a.metal", "utils/b.metal"])
    assert [p for p, _ in out] == ["utils/a.metal", "utils/b.metal", "c.metal"]
    text = dict(out)
    assert "#include" not in text["utils/b.metal"] and "#include" not in text["c.metal"]


def test_local_include_lines_warn(root):
    sources._warned.discard("utils/b.metal")
    with pytest.warns(UserWarning, match="local #include"):
        sources.resolve(["utils/b.metal"])


def test_missing_file_names_who_asked(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(sources.SourceNotFoundError, match="asks.metal includes 'nope.metal'"):
            sources.resolve(["asks.metal"])
    with pytest.raises(sources.SourceNotFoundError, match="Kernel foo includes 'zzz.metal'"):
        sources.resolve(["zzz.metal"], requested_by="Kernel foo")


def test_cycles_and_escapes_are_errors(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="cycle"):
            sources.resolve(["cyc1.metal"])
    with pytest.raises(ValueError, match="may not contain"):
        sources.load("../etc/passwd")


def test_render_is_strict():
    assert sources.render("constexpr int N = {{ N }};", N=4) == "constexpr int N = 4;"
    with pytest.raises(ValueError, match="not given"):
        sources.render("{{ missing }}")


def test_strip_comments():
    assert sources.strip_comments("a; // thread_position_in_grid\nb; /* x_shape */ c;") == "a; \nb;  c;"


def test_package_sources_ship_with_the_package():
    # The compat prelude is package data: it must be found from the installed package.
    roots = sources.source_roots()
    assert (roots[0] / "compat").is_dir()
