"""onnxscript handles for the ONNX Runtime contrib ops we emit (com.microsoft domain).

onnx ships no schemas for them and torch.onnx's tracer needs one to bind inputs and count
outputs, so we declare the parts we use (inputs in ORT's order; see ORT's ContribOperators.md).
"""

from __future__ import annotations

import onnxscript
from onnx.defs import OpSchema

MSFT = onnxscript.values.Opset("com.microsoft", 1)
_OPT = OpSchema.FormalParameterOption.Optional
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _op(name: str, inputs: list[tuple[str, str, bool]], outputs: list[str],
        attrs: dict[str, OpSchema.AttrType], constraints: list[tuple[str, list[str]]]):
    schema = OpSchema(
        name, "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter(n, t, param_option=_OPT if opt else
                                         OpSchema.FormalParameterOption.Single)
                for n, t, opt in inputs],
        outputs=[OpSchema.FormalParameter(n, "T") for n in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in constraints],
        attributes=[OpSchema.Attribute(a, kind, required=False) for a, kind in attrs.items()],
    )
    return onnxscript.values.Op(MSFT, name, schema)


_INT, _FLOAT = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT

# query/key/value [B, S, H*D]; seqlens_k [B] int32 = total length - 1; total_sequence_length
# a scalar int32; attention_bias [B|1, Hq|1, S, T]. Always causal (bottom-right with a past).
GroupQueryAttention = _op(
    "GroupQueryAttention",
    [("query", "T", False), ("key", "T", True), ("value", "T", True),
     ("past_key", "T", True), ("past_value", "T", True), ("seqlens_k", "M", False),
     ("total_sequence_length", "M", False), ("cos_cache", "T", True),
     ("sin_cache", "T", True), ("position_ids", "P", True), ("attention_bias", "T", True)],
    ["output", "present_key", "present_value"],
    {"num_heads": _INT, "kv_num_heads": _INT, "scale": _FLOAT, "softcap": _FLOAT,
     "local_window_size": _INT, "do_rotary": _INT, "rotary_interleaved": _INT},
    [("T", _FLOATS), ("M", ["tensor(int32)"]), ("P", ["tensor(int64)"])],
)

# query [B, Sq, H*D]; key/value [B, H, Sk, D] (BNSH); attention_bias [B|1, H|1, Sq, Sk].
MultiHeadAttention = _op(
    "MultiHeadAttention",
    [("query", "T", False), ("key", "T", True), ("value", "T", True), ("bias", "T", True),
     ("key_padding_mask", "M", True), ("attention_bias", "T", True)],
    ["output"],
    {"num_heads": _INT, "scale": _FLOAT, "unidirectional": _INT, "mask_filter_value": _FLOAT},
    [("T", _FLOATS), ("M", ["tensor(int32)"])],
)
