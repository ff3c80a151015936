"""Graph -> graph transforms over attention sites. Importing this package registers every
variant (one module each) in `rewriter.passes.registry.VARIANTS`, in the order of the README's
table: the variants, then `heal`, which is applied after them."""

# isort: off
# each registers a variant
from rewriter.passes import gqa, prune, share, sparse, drop_attn  # noqa: F401
from rewriter.passes import heal  # noqa: F401
# isort: on
from rewriter.passes.registry import VARIANTS, build_pass, parse_spec

__all__ = ["VARIANTS", "build_pass", "parse_spec"]
