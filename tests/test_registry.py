"""The one variant registry: the spec parser, `rewrite` and the README's table all read it, so
a variant registered with ``@variant`` (one new module) is usable at once."""

from __future__ import annotations

from pathlib import Path

import pytest

import rewriter as rw
from rewriter.ir.specs import Key, positive_int
from rewriter.passes import VARIANTS, parse_spec
from rewriter.passes.base import PassResult
from rewriter.passes.registry import variant, variants_markdown

zoo = pytest.importorskip("zoo")
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_registry():
    text = README.read_text()
    start = text.index("<!-- variants:")
    table = text[text.index("\n", start) + 1:text.index("<!-- /variants -->")]
    assert table == variants_markdown(), "README's variant table is stale; paste:\n" + \
        variants_markdown()


def test_every_variant_documents_its_keys():
    for v in VARIANTS.values():
        assert v.summary and v.usage, v.name
        mentioned = " ".join(v.usage)
        assert all(f"{key}=" in mentioned for key in v.keys), (v.name, v.usage)


@pytest.fixture
def scale_variant():
    """A toy variant, as a new module would add it: multiplies every site's scale."""

    @variant("scale-test", {"factor": Key(positive_int, "a positive integer", required=True,
                                          metavar="F")}, "scales every site's logits")
    class ScalePass:
        name = "scale-test"

        def __init__(self, spec):
            self.spec = spec

        def run(self, program, ctx):  # noqa: ARG002  (no calibration)
            program = program.clone()
            nodes = {n.name: n for n in program.module.graph.nodes}
            for site in program.sites:
                node = nodes[site.node]
                node.kwargs = {**node.kwargs, "scale": node.kwargs["scale"] *
                               self.spec.params["factor"]}
                site.scale = node.kwargs["scale"]
            program.module.recompile()
            return PassResult(program, True, {"factor": self.spec.params["factor"]})

    yield ScalePass
    del VARIANTS["scale-test"]


def test_a_registered_variant_is_usable_everywhere(scale_variant):
    assert parse_spec("scale-test:factor=2").params == {"factor": 2}
    with pytest.raises(rw.SpecError, match="factor"):
        parse_spec("scale-test:factor=zero")
    assert "`scale-test:factor=F`" in variants_markdown()
    prog = rw.capture(zoo.get("llama-sdpa").build(), (zoo._ids(2, 6),), {"use_cache": False})
    new = rw.rewrite(prog, "scale-test:factor=2")
    assert [s.scale for s in new.sites] == [2 * s.scale for s in prog.sites]
    assert new.manifest["passes"][-1] == {"spec": "scale-test:factor=2", "changed": True,
                                          "factor": 2, "parameters_removed": 0}
    assert new.verify(prog).max_rel > 1e-3  # it did change the attention


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        variant("gqa", {}, "again")(type("Again", (), {}))
