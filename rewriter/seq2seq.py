"""Encoder-decoder generation: a captured seq2seq model (T5, BART, Whisper, ...) split into an
encoder and a decoder step with a KV cache.

    s2s = program.decoder()                   # or rewriter.seq2seq.build_seq2seq(program)
    tokens = s2s.generate(input_ids, max_new_tokens=32, attention_mask=mask)  # [B, 1 + n]
    tokens = s2s.generate(input_features, 32)                                 # Whisper

The program is captured on the encoder's inputs and ``decoder_input_ids`` (the model's call
with ``use_cache=False``). Its graph is cut where the decoder reads the encoder:

1. ``encoder`` (a GraphModule) keeps every node that reads the encoder's inputs and not the
   decoder's tokens; it returns the values the decoder reads ("context"): each cross-attention
   site's K and V ([B, H, Ssrc, D], computed once per sequence, as Hugging Face's cross
   cache), and what the cross masks read (the encoder's attention_mask).
2. The rest reads the context as inputs and goes through the causal LM's cache surgery
   (rewriter.decoder.cached_step): self-attention sites get a KV cache, cross-attention sites
   attend over the context as they are. T5's decoder self-attention mask (relative position
   bias + causal) is recomputed over all P + S positions and its last S rows kept.

The batch size is read from the encoder's inputs in both halves (the capture may read it from
``decoder_input_ids``, which would put the whole encoder on the decoder's side).

Shape glossary: B batch, Ssrc encoder positions, S new decoder tokens, P cached decoder
tokens, H heads, D head dim. ``build_seq2seq`` checks the pair against the program (encoder,
then a prefill and one step == one forward over the whole decoder sequence, in float64).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import CodeGen, Graph, GraphModule, Node
from torch.utils._pytree import tree_leaves

from rewriter.decoder import Decoder, DecoderError, cached_step
from rewriter.ir.graph import canonical_nodes, cleanup, copy_graph, descendants
from rewriter.ir.precision import (
    EXACT_TOLERANCE,
    float64_module,
    max_relative_error,
    to_float64,
)

__all__ = ["DECODER_INPUT", "Seq2Seq", "build_seq2seq", "is_seq2seq"]

aten = torch.ops.aten
DECODER_INPUT = "decoder_input_ids"


def is_seq2seq(program) -> bool:
    """Whether ``program`` was captured with decoder token ids beside the encoder's inputs."""
    return any(n.op == "placeholder" and n.name == DECODER_INPUT
               for n in program.module.graph.nodes)


@dataclass
class Seq2Seq:
    """An encoder and a decoder step (see the module docstring)."""

    encoder: GraphModule  # forward(*encoder_inputs) -> tuple of the decoder's context
    decoder: Decoder  # step(ids, past, context=encoder outputs)
    encoder_inputs: tuple[str, ...]
    program: object = field(repr=False)
    start_token: int | None = None
    verify_error: float = float("nan")
    # per encoder input, its dynamic axes: {axis: "batch" | "encoder_sequence"}
    input_axes: tuple[dict[int, str], ...] = ()

    @property
    def context(self) -> tuple[str, ...]:
        return self.decoder.context

    def example_inputs(self) -> list[torch.Tensor]:
        """The encoder's inputs from the program's example (capture's) inputs."""
        return _example_sources(self.program, list(self.encoder_inputs))

    def encode(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's context from the encoder's inputs (positional in ``encoder_inputs``
        order, or by name)."""
        inputs = dict(zip(self.encoder_inputs, args, strict=False))
        inputs.update((k, v) for k, v in kwargs.items() if k in self.encoder_inputs)
        missing = [n for n in self.encoder_inputs if n not in inputs]
        if missing:
            raise DecoderError(f"the encoder needs {', '.join(missing)} (its inputs: "
                               f"{', '.join(self.encoder_inputs)})")
        with torch.no_grad():
            return list(self.encoder(*(inputs[n] for n in self.encoder_inputs)))

    def generate(self, inputs: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, *,
                 decoder_start_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding: ``inputs`` (token ids [B, Ssrc], or Whisper's features) through
        the encoder once, then ``max_new_tokens`` decoder steps from the start token. Returns
        [B, 1 + max_new_tokens] decoder token ids, as ``model.generate`` does."""
        start = self.start_token if decoder_start_token_id is None else decoder_start_token_id
        if start is None:
            raise DecoderError("no decoder_start_token_id: the program has no transformers "
                               "config saying it; pass decoder_start_token_id=")
        named = {self.encoder_inputs[0]: inputs}
        if len(self.encoder_inputs) > 1:
            mask_name = self.encoder_inputs[1]
            named[mask_name] = torch.ones(inputs.shape[:2], dtype=torch.long) \
                if attention_mask is None else attention_mask
        elif attention_mask is not None:
            raise DecoderError(f"this encoder takes no attention mask (inputs: "
                               f"{', '.join(self.encoder_inputs)})")
        context = self.encode(**named)
        batch = inputs.shape[0]
        token = torch.full((batch, 1), start, dtype=torch.long)
        past, out = self.decoder.empty_cache(batch), [token]
        for _ in range(max_new_tokens):
            logits, past = self.decoder.step(token, past, context=context)
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
        return torch.cat(out, dim=1)


def build_seq2seq(program, *, check: bool = True, bounded: bool = True) -> Seq2Seq:
    """The program as an encoder and a cached decoder step; raises DecoderError when the
    program has no ``decoder_input_ids`` input, when the decoder reads the encoder other than
    through tensors, or (``check``) when the pair does not reproduce the program."""
    graph = copy_graph(program.module)
    _drop_guards(graph)
    tensors = [n for n in graph.nodes if n.op == "placeholder"
               and isinstance(n.meta.get("val"), torch.Tensor)]
    ids = next((n for n in tensors if n.name == DECODER_INPUT), None)
    if ids is None:
        raise DecoderError(f"not an encoder-decoder capture: no {DECODER_INPUT} input "
                           f"(inputs: {', '.join(n.name for n in tensors)})")
    sources = [n for n in tensors if n is not ids]
    if not sources:
        raise DecoderError("the program has no encoder inputs beside decoder_input_ids")
    if not isinstance(ids.meta["val"].shape[1], torch.SymInt):
        raise DecoderError("the program was captured with a static decoder length: capture "
                           "with dynamic=True to build a decoder")
    _batch_from_encoder(graph, ids, sources[0])
    decoder_side = descendants(ids)
    encoder_side = set().union(*(descendants(s) for s in sources)) - decoder_side
    boundary = [n for n in graph.nodes if n in encoder_side
                and any(u in decoder_side for u in n.users)]
    names = _context_names(graph, boundary, decoder_side)
    encoder = _encoder_module(program, graph, names, sources, decoder_side)
    examples = _context_examples(encoder, program, sources)
    _cut_encoder(graph, sources, boundary, names, decoder_side, encoder_side, examples)
    step = cached_step(program, graph, ids, bounded=bounded)
    _keep_outputs(encoder, [list(names.values()).index(n) for n in step.context])
    config = getattr(program, "hf_config", None)
    start = getattr(config, "decoder_start_token_id", None)
    s2s = Seq2Seq(encoder, step, tuple(n.name for n in sources), program,
                  None if start is None else int(start),
                  input_axes=_input_axes(sources, _example_sources(
                      program, [n.name for n in sources])))
    if check:
        s2s.verify_error = s2s.decoder.verify_error = check_seq2seq(s2s)
    return s2s


def check_seq2seq(s2s: Seq2Seq, prompt_len: int = 6, tolerance: float = EXACT_TOLERANCE
                  ) -> float:
    """The encoder, a prefill of ``prompt_len`` decoder tokens and one step, against one
    forward of the program over all of them, in float64; raises DecoderError past
    ``tolerance``. Returns the max relative error."""
    program = s2s.program
    kwargs = {k: v for k, v in program.example_kwargs.items() if k != DECODER_INPUT}
    example = dict(zip(s2s.encoder_inputs, s2s.example_inputs(), strict=True))
    batch = next(iter(example.values())).shape[0]
    vocab = int(_output_leaf(s2s.decoder.module).meta["val"].shape[-1])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt_len + 1), generator=gen)
    shared: dict = {}
    full = float64_module(program.module, shared)
    encoder = float64_module(s2s.encoder, shared)
    step = float64_module(s2s.decoder.module, shared)
    as64 = to_float64(example)
    with torch.no_grad():
        want = _logits(full(**{**kwargs, **as64, DECODER_INPUT: ids}))
        context = list(encoder(*(as64[n] for n in s2s.encoder_inputs)))
        first, *past = step(ids[:, :-1], *s2s.decoder.empty_cache(batch, torch.float64),
                            *context)
        last, *_ = step(ids[:, -1:], *past, *context)
        got = torch.cat([first, last], dim=1)
    err = max_relative_error(got, want)
    if not err <= tolerance:
        raise DecoderError(f"the encoder-decoder split does not reproduce the program (encoder "
                           f"+ prefill + step vs one forward in float64: max relative error "
                           f"{err:.2e} > {tolerance:g})")
    return err


# --- the cut ---------------------------------------------------------------------------------

def _drop_guards(graph: Graph) -> None:
    """Export's input guards read every input: they would tie the halves together."""
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)


def _batch_from_encoder(graph: Graph, ids: Node, source: Node) -> None:
    """Sizes read off the decoder's batch axis are read off the encoder's first input
    (the same batch), so encoder nodes never depend on the decoder's tokens for it."""
    batch = ids.meta["val"].shape[0]
    if str(source.meta["val"].shape[0]) != str(batch):
        raise DecoderError(f"the encoder input {source.name} and {DECODER_INPUT} have "
                           "different batch sizes at capture")
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for node in list(ids.users):
        if node.target is aten.sym_size.int and node.args[1] == 0:
            with graph.inserting_after(last):
                size = graph.call_function(aten.sym_size.int, (source, 0))
            size.meta = dict(node.meta)
            node.replace_all_uses_with(size)
            graph.erase_node(node)


def _context_names(graph: Graph, boundary: list[Node], decoder_side: set[Node]
                   ) -> dict[Node, str]:
    """cross_key_<n> / cross_value_<n> for the cross-attention sites' K and V (in site
    order), encoder_<input> for an encoder input, encoder_<node> for anything else."""
    names: dict[Node, str] = {}
    n = 0
    for node in canonical_nodes(graph).values():
        k, v = node.args[1], node.args[2]
        if node in decoder_side and k in boundary and k not in names:
            names[k] = f"cross_key_{n}"
            if v is not k:
                names[v] = f"cross_value_{n}"
            n += 1
    for node in boundary:
        if node not in names and isinstance(node.meta.get("val"), torch.Tensor):
            names[node] = f"encoder_{node.name}"
    return names


def _encoder_module(program, graph: Graph, names: dict[Node, str], sources: list[Node],
                    decoder_side: set[Node]) -> GraphModule:
    """forward(*sources) -> the context tensors, in ``names`` order."""
    encoder = Graph()
    env: dict[Node, Node] = {}
    encoder.graph_copy(graph, env)  # no output: it is set below
    encoder.output(tuple(env[n] for n in names))
    for node in reversed(list(graph.nodes)):  # the decoder's side goes (mutations included)
        if node in decoder_side and node.op != "output":
            encoder.erase_node(env[node])
    keep = {env[s] for s in sources}
    for node in list(encoder.nodes):  # and the static inputs (use_cache=False, ...)
        if node.op == "placeholder" and node not in keep and not node.users:
            encoder.erase_node(node)
    encoder.set_codegen(CodeGen())
    module = GraphModule(program.module, encoder, class_name="Encoder")
    cleanup(module)
    return module


def _cut_encoder(graph: Graph, sources: list[Node], boundary: list[Node],
                 names: dict[Node, str], decoder_side: set[Node], encoder_side: set[Node],
                 examples: list[tuple[torch.Tensor, dict[int, str]]]) -> None:
    """The decoder half, in place: context placeholders after ``ids`` replace the boundary
    (sizes of the context are read off the context), the encoder's nodes and inputs go, and
    the output is the logits alone."""
    ids = next(n for n in decoder_side if n.op == "placeholder")
    last, placeholders = ids, {}
    for (node, name), (value, axes) in zip(names.items(), examples, strict=True):
        with graph.inserting_after(last):
            last = placeholders[node] = graph.placeholder(name)
        last.meta["val"], last.meta["rewriter_axes"] = value, axes
    for node in boundary:
        if node in placeholders:
            replacement = placeholders[node]
        else:
            replacement = _size_of_context(graph, node, placeholders, last)
        node.replace_all_uses_with(replacement,
                                   delete_user_cb=lambda user: user in decoder_side)
    output = next(n for n in graph.nodes if n.op == "output")
    logits = _output_leaf(graph)
    if logits not in decoder_side:
        raise DecoderError("the program's first output does not read decoder_input_ids: not "
                           "the decoder's logits")
    graph.erase_node(output)
    graph.output((logits,))
    for node in reversed(list(graph.nodes)):
        if node in encoder_side:
            if node.users:
                raise DecoderError(f"the decoder reads {node.name} from the encoder's side in "
                                   "a way the cut cannot pass on")
            graph.erase_node(node)


def _context_examples(encoder: GraphModule, program, sources: list[Node]
                      ) -> list[tuple[torch.Tensor, dict[int, str]]]:
    """Each context tensor from the program's example inputs, with its dynamic axes:
    ``{axis: "batch" | "encoder_sequence"}``, found by running the encoder again on inputs one
    row and one position longer (on their dynamic axes)."""
    inputs = _example_sources(program, [s.name for s in sources])
    grown = []
    # the batch, and the positions of token ids and masks (features keep their frames)
    for x, axes in zip(inputs, _input_axes(sources, inputs), strict=True):
        for axis in axes:
            x = torch.cat([x, x.narrow(axis, 0, 1)], dim=axis)
        grown.append(x)
    with torch.no_grad():
        before, after = encoder(*inputs), encoder(*grown)
    batch = int(inputs[0].shape[0])
    out = []
    for a, b in zip(before, after, strict=True):
        axes = {axis: "batch" if axis == 0 and n == batch else "encoder_sequence"
                for axis, (n, m) in enumerate(zip(a.shape, b.shape, strict=True)) if n != m}
        out.append((a, axes))
    return out


def _example_sources(program, names: list[str]) -> list[torch.Tensor]:
    named = dict(zip(names, program.example_args, strict=False))
    named.update((k, v) for k, v in program.example_kwargs.items() if k in names)
    return [named[n] for n in names]


def _input_axes(sources: list[Node], inputs: list[torch.Tensor]) -> tuple[dict[int, str], ...]:
    """The axes ``_context_examples`` grows: the batch, and a token input's positions."""
    return tuple({axis: "batch" if axis == 0 else "encoder_sequence"
                  for axis in ((0,) if x.is_floating_point() else range(x.dim()))
                  if isinstance(s.meta["val"].shape[axis], torch.SymInt)}
                 for s, x in zip(sources, inputs, strict=True))


def _keep_outputs(module: GraphModule, keep: list[int]) -> None:
    """The encoder returns only the context the decoder step still reads."""
    output = next(n for n in module.graph.nodes if n.op == "output")
    values = output.args[0]
    output.args = (tuple(values[i] for i in keep),)
    cleanup(module)


def _size_of_context(graph: Graph, node: Node, placeholders: dict[Node, Node], last: Node
                     ) -> Node | int:
    """A size the decoder reads off the encoder's side (Ssrc, ...), read off a context input
    with that size instead."""
    value = node.meta.get("val")
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        for boundary, ph in placeholders.items():  # the boundary's value is still symbolic
            for axis, size in enumerate(boundary.meta["val"].shape):
                if str(size) == str(value):
                    with graph.inserting_after(last):
                        return graph.call_function(aten.sym_size.int, (ph, axis))
    raise DecoderError(f"the decoder reads {node.name} ({node.op} {node.target}) from the "
                       "encoder's side, which is neither a tensor nor a size of one")


def _output_leaf(graph_or_module) -> Node:
    graph = getattr(graph_or_module, "graph", graph_or_module)
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = [x for x in tree_leaves(output.args[0]) if isinstance(x, Node)]
    if not leaves:
        raise DecoderError("the program has no tensor output")
    return leaves[0]


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]
