"""Graph -> graph transforms over attention sites. Importing this package registers every
variant's spec schema (see rewriter.specs) and pass class (see PASSES)."""

from rewriter.passes.gqa import GqaPass
from rewriter.passes.prune import PrunePass
from rewriter.passes.share import SharePass
from rewriter.passes.sparse import SparsePass

# spec name -> pass class (constructed with the parsed Spec)
PASSES = {
    "gqa": GqaPass,
    "prune-heads": PrunePass,
    "sparse": SparsePass,
    "share-kv": SharePass,
    "share-attn": SharePass,
}

__all__ = ["PASSES"]
