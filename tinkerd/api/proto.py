"""The `tinker_public` protobuf schema (SDK 0.38), built in code.

Why in code: no protoc step and no generated file to keep in sync; the schema is small and its
field numbers are the wire contract (docs/tinker-protocol.md §4.3). The file is registered under
its own name in a private descriptor pool, so it never clashes with the SDK's
`tinker_public.proto` when both are imported in one process (the tests use the SDK as reference).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

FDP = descriptor_pb2.FieldDescriptorProto

PACKAGE = "tinker_public"
FILE_NAME = "tinkerd_tinker_public.proto"

_SCALARS: dict[str, int] = {
    "string": FDP.TYPE_STRING,
    "bytes": FDP.TYPE_BYTES,
    "bool": FDP.TYPE_BOOL,
    "double": FDP.TYPE_DOUBLE,
    "float": FDP.TYPE_FLOAT,
    "int32": FDP.TYPE_INT32,
    "int64": FDP.TYPE_INT64,
    "uint32": FDP.TYPE_UINT32,
    "uint64": FDP.TYPE_UINT64,
}
_ENUMS = {"StopReason", "DType"}

# One field: (name, number, type, modifier). type is a scalar name, an enum or a message name
# (of this package). modifier: "" (singular), "repeated", "optional" (proto3 optional),
# "oneof:<name>" (member of a real oneof) or "map:<key>:<value>" (type is then ignored).
_Field = tuple[str, int, str, str]

_MESSAGES: dict[str, list[_Field]] = {
    "ForwardBackwardRequest": [
        ("model_id", 1, "string", ""),
        ("seq_id", 2, "int32", ""),
        ("data", 3, "Datum", "repeated"),
        ("loss_fn", 4, "string", ""),
        ("loss_fn_config", 5, "", "map:string:double"),
        ("forward_only", 6, "bool", ""),
        ("loss_fn_config_v2", 7, "", "map:string:LossConfigValue"),
    ],
    "LossConfigValue": [
        ("number", 1, "double", "oneof:value"),
        ("text", 2, "string", "oneof:value"),
    ],
    "Datum": [
        ("model_input", 1, "Chunk", "repeated"),
        ("loss_fn_inputs", 2, "", "map:string:Tensor"),
        ("model_input_spans", 3, "ProvenanceSpan", "repeated"),
        ("loss_fn_input_spans", 4, "ProvenanceSpan", "repeated"),
    ],
    "ProvenanceSpan": [
        ("prompt_tokens", 1, "PromptProvenanceSpan", "oneof:span"),
        ("sampled_tokens", 2, "SampledProvenanceSpan", "oneof:span"),
    ],
    "PromptProvenanceSpan": [
        ("sequence_id", 1, "string", ""),
        ("offset", 2, "int64", ""),
        ("length", 3, "int64", ""),
    ],
    "SampledProvenanceSpan": [
        ("sequence_id", 1, "string", ""),
        ("offset", 2, "int64", ""),
        ("length", 3, "int64", ""),
    ],
    "Chunk": [
        ("encoded_text", 1, "EncodedTextChunk", "oneof:chunk"),
        ("image", 2, "ImageChunk", "oneof:chunk"),
        ("dmel", 3, "DmelChunk", "oneof:chunk"),
    ],
    "EncodedTextChunk": [("tokens", 1, "bytes", "")],
    "ImageChunk": [
        ("data", 1, "bytes", ""),
        ("format", 2, "string", ""),
        ("expected_tokens", 3, "int32", "optional"),
        ("override_dimensions", 4, "ImageDimensions", "optional"),
    ],
    "ImageDimensions": [("width", 1, "uint32", ""), ("height", 2, "uint32", "")],
    "DmelChunk": [("dmel", 1, "bytes", "")],
    "Tensor": [
        ("dense", 1, "bytes", "oneof:encoding"),
        ("sparse_csr", 2, "SparseCsr", "oneof:encoding"),
        ("dtype", 3, "DType", ""),
        ("shape", 4, "int64", "repeated"),
    ],
    "SparseCsr": [
        ("values", 1, "bytes", ""),
        ("crow_indices", 2, "bytes", ""),
        ("col_indices", 3, "bytes", ""),
    ],
    "ForwardBackwardOutput": [
        ("loss_fn_output_type", 1, "string", ""),
        ("loss_fn_outputs", 2, "ArrayRecord", "repeated"),
        ("metrics", 3, "", "map:string:double"),
    ],
    "ArrayRecord": [
        ("type_tag", 1, "string", ""),
        ("fields", 2, "", "map:string:BatchedTensor"),
        ("num_datums", 3, "int64", ""),
    ],
    "BatchedTensor": [
        ("data", 1, "bytes", ""),
        ("offsets", 2, "bytes", ""),
        ("dtype", 3, "DType", ""),
        ("trailing_shape", 4, "int64", "repeated"),
    ],
    "SampleResponse": [
        ("sequences", 1, "SampledSequence", "repeated"),
        ("prompt_logprobs", 2, "bytes", "optional"),
        ("topk_prompt_logprobs", 3, "TopkLogprobs", "optional"),
        ("prompt_cache_hit_tokens", 4, "int32", ""),
        ("target_prompt_logprobs", 5, "Tensor", "optional"),
        ("prompt_alt_tokens", 6, "PromptAltTokens", "optional"),
    ],
    "PromptAltTokens": [("tokens", 1, "Tensor", ""), ("logprobs", 2, "Tensor", "")],
    "SampledSequence": [
        ("stop_reason", 1, "StopReason", ""),
        ("tokens", 2, "bytes", ""),
        ("logprobs", 3, "bytes", "optional"),
        ("topk_sampled_logprobs", 4, "TopkLogprobs", "optional"),
    ],
    "TopkLogprobs": [
        ("token_ids", 1, "bytes", ""),
        ("logprobs", 2, "bytes", ""),
        ("k", 3, "uint32", ""),
        ("length", 4, "uint32", ""),
    ],
    "SamplingParams": [
        ("max_tokens", 1, "int32", "optional"),
        ("seed", 2, "uint64", "optional"),
        ("temperature", 3, "float", "optional"),
        ("top_k", 4, "int32", "optional"),
        ("top_p", 5, "float", "optional"),
        ("stop_strs", 6, "StopStrings", "oneof:stop"),
        ("stop_tokens", 7, "StopTokens", "oneof:stop"),
    ],
    "StopStrings": [("values", 1, "string", "repeated")],
    "StopTokens": [("values", 1, "int32", "repeated")],
}

_ENUM_VALUES: dict[str, list[tuple[str, int]]] = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [
        ("DTYPE_UNSPECIFIED", 0),
        ("DTYPE_FLOAT32", 1),
        ("DTYPE_INT64", 2),
        ("DTYPE_INT32", 3),
        ("DTYPE_BFLOAT16", 4),
    ],
}


def _set_type(field: descriptor_pb2.FieldDescriptorProto, type_name: str) -> None:
    """Point `field` at a scalar, enum or message type of this package."""
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]  # type: ignore[assignment]
    elif type_name in _ENUMS:
        field.type = FDP.TYPE_ENUM
        field.type_name = f".{PACKAGE}.{type_name}"
    else:
        field.type = FDP.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{type_name}"


def _camel(name: str) -> str:
    """protoc's map entry naming: loss_fn_config_v2 -> LossFnConfigV2Entry."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_")) + "Entry"


def _build_message(name: str, fields: list[_Field]) -> descriptor_pb2.DescriptorProto:
    """One DescriptorProto, with synthetic oneofs for proto3 `optional` declared after real ones
    (protoc's order, so descriptors compare equal to the SDK's)."""
    msg = descriptor_pb2.DescriptorProto(name=name)
    oneofs: list[str] = []
    for _, _, _, mod in fields:
        if mod.startswith("oneof:") and mod[6:] not in oneofs:
            oneofs.append(mod[6:])
    synthetic = [f"_{fname}" for fname, _, _, mod in fields if mod == "optional"]
    for oneof in oneofs + synthetic:
        msg.oneof_decl.add(name=oneof)
    for fname, number, ftype, mod in fields:
        field = msg.field.add(name=fname, number=number, label=FDP.LABEL_OPTIONAL)
        if mod.startswith("map:"):
            _, key_type, value_type = mod.split(":")
            entry = msg.nested_type.add(name=_camel(fname))
            entry.options.map_entry = True
            key = entry.field.add(name="key", number=1, label=FDP.LABEL_OPTIONAL)
            _set_type(key, key_type)
            value = entry.field.add(name="value", number=2, label=FDP.LABEL_OPTIONAL)
            _set_type(value, value_type)
            field.label = FDP.LABEL_REPEATED
            field.type = FDP.TYPE_MESSAGE
            field.type_name = f".{PACKAGE}.{name}.{entry.name}"
            continue
        _set_type(field, ftype)
        if mod == "repeated":
            field.label = FDP.LABEL_REPEATED
        elif mod == "optional":
            field.proto3_optional = True
            field.oneof_index = len(oneofs) + synthetic.index(f"_{fname}")
        elif mod.startswith("oneof:"):
            field.oneof_index = oneofs.index(mod[6:])
    return msg


def build_file_descriptor_proto() -> descriptor_pb2.FileDescriptorProto:
    """The whole schema as a FileDescriptorProto (exposed so tests can diff it with the SDK's)."""
    fdp = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto3")
    for name, fields in _MESSAGES.items():
        fdp.message_type.append(_build_message(name, fields))
    for name, values in _ENUM_VALUES.items():
        enum = fdp.enum_type.add(name=name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    return fdp


POOL = descriptor_pool.DescriptorPool()
FILE_DESCRIPTOR = POOL.AddSerializedFile(build_file_descriptor_proto().SerializeToString())


def _cls(name: str) -> Any:
    """The concrete message class for `tinker_public.<name>` in our private pool."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ForwardBackwardRequest: Any = _cls("ForwardBackwardRequest")
LossConfigValue: Any = _cls("LossConfigValue")
Datum: Any = _cls("Datum")
ProvenanceSpan: Any = _cls("ProvenanceSpan")
PromptProvenanceSpan: Any = _cls("PromptProvenanceSpan")
SampledProvenanceSpan: Any = _cls("SampledProvenanceSpan")
Chunk: Any = _cls("Chunk")
EncodedTextChunk: Any = _cls("EncodedTextChunk")
ImageChunk: Any = _cls("ImageChunk")
ImageDimensions: Any = _cls("ImageDimensions")
DmelChunk: Any = _cls("DmelChunk")
Tensor: Any = _cls("Tensor")
SparseCsr: Any = _cls("SparseCsr")
ForwardBackwardOutput: Any = _cls("ForwardBackwardOutput")
ArrayRecord: Any = _cls("ArrayRecord")
BatchedTensor: Any = _cls("BatchedTensor")
SampleResponse: Any = _cls("SampleResponse")
PromptAltTokens: Any = _cls("PromptAltTokens")
SampledSequence: Any = _cls("SampledSequence")
TopkLogprobs: Any = _cls("TopkLogprobs")
SamplingParams: Any = _cls("SamplingParams")
StopStrings: Any = _cls("StopStrings")
StopTokens: Any = _cls("StopTokens")

STOP_REASON_STOP = 0
STOP_REASON_LENGTH = 1
DTYPE_UNSPECIFIED = 0
DTYPE_FLOAT32 = 1
DTYPE_INT64 = 2
DTYPE_INT32 = 3
DTYPE_BFLOAT16 = 4
