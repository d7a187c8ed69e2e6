"""The house rules, read from the source: every module belongs to a layer, imports only from its own layer
or below, no imports form a circle, and the generated tables in docs/ are current."""

from pathlib import Path

import pytest

from minsnr import reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def graph():
    return reference.imports()


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "minsnr"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import minsnr.b as b\n")
    (pkg / "b.py").write_text("def f():\n    from minsnr.sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import x\n")
    g = reference.imports(pkg)
    assert g["a"] == {"b"} and g["b"] == {"sub", "sub.c"} and g["sub"] == set() and g["sub.c"] == {"a"}
    assert reference.circles(g) == [["a", "b", "sub.c"]]
    assert reference.floors({"x": set(), "y": {"x"}, "z": {"x", "y"}}) == {"x": 1, "y": 2, "z": 3}


def test_every_module_imports_only_from_its_layer_or_below(graph):
    assert reference.climbs(graph) == []
    assert reference.layer_of("loss") > reference.layer_of("config") > reference.layer_of("data.loader")
    assert reference.layer_of("compare.runner") > reference.layer_of("train")
    assert reference.climbs({"schedule": {"train"}, "train": set()}) == ["schedule -> train"]  # it would say so


def test_no_circle(graph):
    assert reference.circles(graph) == []


def test_generated_docs_are_current(graph):
    for doc, markers, content in reference.generated():
        assert reference.block(doc.read_text(), markers) == content, f"{doc.name} is stale: python -m minsnr.reference"
