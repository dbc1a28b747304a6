"""Wire codec: Tinker protobuf / JSON payloads <-> tinkerd model-layer types.

Why a separate layer: the HTTP handlers stay thin, and every byte-level rule of the protocol
(int32 token buffers, CSR tensors, byte offsets, NaN for unscored prompt positions, top-k
sentinels) lives in one place that tests check against the real SDK. See
docs/tinker-protocol.md §4.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zstandard
from google.protobuf.message import DecodeError

from tinkerd.api import proto
from tinkerd.model.sampling import MAX_OUTPUT_CELLS
from tinkerd.model.types import (
    Datum,
    ForwardBackwardOutput,
    ImageInput,
    ProvenanceSpan,
    SampleOutput,
)
from tinkerd.model.vision import MAX_IMAGE_BYTES, MAX_IMAGE_TOKENS

# A forward_backward body is a few MB at most (the SDK chunks at ~5 MB); this caps a zstd/gzip
# bomb without getting in the way of real requests.
MAX_DECOMPRESSED_BYTES = 256 << 20

# Top-k cells with nothing in them (the SDK's MASK_LOGPROB sentinel, token id 0).
TOPK_EMPTY_TOKEN = 0
TOPK_EMPTY_LOGPROB = -99999.0

# Cells a decoded tensor may have. Real inputs are (N,) or (N, K) with N within the context;
# without a bound a tiny CSR message declaring a huge shape would densify into gigabytes.
MAX_TENSOR_CELLS = 1 << 26

# Why image chunks are refused when the caller does not say the model takes them.
NO_IMAGES = "image inputs are not supported by this server"
IMAGE_FORMATS = ("png", "jpeg")

# Keys whose values are token ids; every other loss_fn_input is float32.
_INT_KEYS = frozenset({"target_tokens"})

_PROTO_DTYPE_NP: dict[int, np.dtype[Any]] = {
    proto.DTYPE_FLOAT32: np.dtype("<f4"),
    proto.DTYPE_INT64: np.dtype("<i8"),
    proto.DTYPE_INT32: np.dtype("<i4"),
    proto.DTYPE_BFLOAT16: np.dtype("<u2"),
}
_PROTO_DTYPE_NAME = {
    proto.DTYPE_FLOAT32: "float32",
    proto.DTYPE_INT64: "int64",
    proto.DTYPE_INT32: "int32",
    proto.DTYPE_BFLOAT16: "bfloat16",
}


class CodecError(ValueError):
    """A request payload that cannot be decoded; the message is safe to show the caller (400)."""


@dataclass
class ForwardBackwardRequestData:
    """A decoded `tinker_public.ForwardBackwardRequest`.

    `loss_fn_config` holds every numeric config value (legacy map merged with v2 numbers, v2
    winning); string values (e.g. a custom `loss_id`) are only in `loss_fn_config_text`.
    """

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float] = field(default_factory=dict)
    loss_fn_config_text: dict[str, str] = field(default_factory=dict)
    forward_only: bool = False
    data: list[Datum] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Request side: bytes -> model types


def _read_capped(reader: Any, limit: int) -> bytes:
    """Read a decompressing stream to its end or to `limit` bytes, whichever comes first."""
    parts: list[bytes] = []
    total = 0
    while total < limit:
        part = reader.read(min(1 << 20, limit - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def decompress_body(
    body: bytes, content_encoding: str | None, *, max_size: int = MAX_DECOMPRESSED_BYTES
) -> bytes:
    """Undo `Content-Encoding` (the SDK sends zstd when `proto_compress_fwdbwd` is on)."""
    encodings = [e.strip().lower() for e in (content_encoding or "").split(",") if e.strip()]
    for encoding in reversed(encodings):  # applied in listed order, so undone in reverse
        if encoding == "identity":
            continue
        try:
            if encoding == "zstd":
                out = _read_capped(
                    zstandard.ZstdDecompressor().stream_reader(
                        io.BytesIO(body), read_across_frames=True
                    ),
                    max_size + 1,
                )
            elif encoding in ("gzip", "x-gzip"):
                out = _read_capped(gzip.GzipFile(fileobj=io.BytesIO(body)), max_size + 1)
            elif encoding == "deflate":
                out = zlib.decompressobj().decompress(body, max_size + 1)
            else:
                raise CodecError(f"unsupported Content-Encoding: {encoding!r}")
        except CodecError:
            raise
        except (zstandard.ZstdError, OSError, EOFError, zlib.error) as exc:
            raise CodecError(f"request body is not valid {encoding} data: {exc}") from exc
        if len(out) > max_size:
            raise CodecError(f"decompressed request body exceeds {max_size} bytes")
        body = out
    return body


def _frombuffer(buf: bytes, dtype: np.dtype[Any], what: str) -> np.ndarray:
    """A read-only numpy view of a little-endian buffer, with a clear error on a ragged size."""
    if len(buf) % dtype.itemsize:
        raise CodecError(
            f"{what}: {len(buf)} bytes is not a multiple of the element size {dtype.itemsize}"
        )
    return np.frombuffer(buf, dtype=dtype)


def _to_torch(arr: np.ndarray, proto_dtype: int, key: str, what: str) -> torch.Tensor:
    """Cast a decoded array to the dtype the model layer wants: int64 for token ids, else f32."""
    if proto_dtype == proto.DTYPE_BFLOAT16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    if key in _INT_KEYS:
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise CodecError(f"{what}: token ids must be integers")
        return torch.from_numpy(arr.astype(np.int64))
    return torch.from_numpy(arr.astype(np.float32))


def _csr_to_dense(
    values: np.ndarray,
    crow: np.ndarray,
    col: np.ndarray,
    shape: list[int],
    pad: float,
    what: str,
    max_cells: int = MAX_TENSOR_CELLS,
) -> np.ndarray:
    """Densify a 2-D CSR matrix, checking every index so bad input cannot crash or misplace."""
    if len(shape) != 2 or min(shape) < 0:
        raise CodecError(f"{what}: a sparse CSR tensor needs a 2-D shape, got {shape}")
    nrows, ncols = shape
    if nrows * ncols > max_cells:
        raise CodecError(f"{what}: shape {shape} has more than {max_cells} cells")
    nnz = len(values)
    if len(crow) != nrows + 1:
        raise CodecError(f"{what}: crow_indices has {len(crow)} entries, expected {nrows + 1}")
    if len(col) != nnz:
        raise CodecError(f"{what}: col_indices has {len(col)} entries but there are {nnz} values")
    if crow[0] != 0 or crow[-1] != nnz or np.any(np.diff(crow) < 0):
        raise CodecError(f"{what}: crow_indices must rise from 0 to the number of values")
    if nnz and (col.min() < 0 or col.max() >= ncols):
        raise CodecError(f"{what}: col_indices out of range for {ncols} columns")
    dense = np.full((nrows, ncols), pad, dtype=values.dtype)
    rows = np.repeat(np.arange(nrows), np.diff(crow))
    dense[rows, col] = values
    return dense


def _check_shape(shape: list[int], size: int, what: str) -> list[int]:
    """Infer 1-D from an empty shape; otherwise a 1-D or 2-D shape that covers exactly `size`
    elements (every Tinker tensor input is (N,) or (N, K))."""
    if not shape:
        return [size]
    if len(shape) > 2:
        raise CodecError(f"{what}: shape {shape} has {len(shape)} dimensions; at most 2")
    if any(d < 0 for d in shape) or math.prod(shape) != size:
        raise CodecError(f"{what}: shape {shape} does not match {size} elements")
    return shape


def _tensor_from_proto(msg: Any, key: str, what: str) -> torch.Tensor:
    """Decode a proto `Tensor` (dense or CSR with pad 0) into a torch tensor."""
    np_dtype = _PROTO_DTYPE_NP.get(msg.dtype)
    if np_dtype is None:
        raise CodecError(f"{what}: unsupported tensor dtype enum {msg.dtype}")
    shape = list(msg.shape)
    encoding = msg.WhichOneof("encoding")
    if encoding == "sparse_csr":
        csr = msg.sparse_csr
        values = _frombuffer(csr.values, np_dtype, f"{what} values")
        crow = _frombuffer(csr.crow_indices, np.dtype("<i8"), f"{what} crow_indices")
        col = _frombuffer(csr.col_indices, np.dtype("<i8"), f"{what} col_indices")
        arr = _csr_to_dense(values, crow, col, shape, 0, what)
    else:  # dense, or unset (an empty tensor)
        arr = _frombuffer(msg.dense, np_dtype, what)
        arr = arr.reshape(_check_shape(shape, arr.size, what))
    return _to_torch(arr, msg.dtype, key, what)


def image_input(
    data: bytes, fmt: Any, expected_tokens: Any, position: int, where: str
) -> ImageInput:
    """An image chunk's fields checked (format, byte bound, expected_tokens); its pixels are
    decoded and its token count checked by the model layer (`tinkerd.model.vision`)."""
    if fmt not in IMAGE_FORMATS:
        raise CodecError(f"{where}: image format must be 'png' or 'jpeg', got {fmt!r}")
    if not data:
        raise CodecError(f"{where}: image data is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise CodecError(f"{where}: image has {len(data)} bytes; at most {MAX_IMAGE_BYTES}")
    if expected_tokens is None:
        raise CodecError(
            f"{where}: expected_tokens is required (the image's token count, as the "
            "cookbook's image_to_chunk sets it)"
        )
    if isinstance(expected_tokens, bool) or not isinstance(expected_tokens, int):
        raise CodecError(f"{where}: expected_tokens must be an integer")
    if not 1 <= expected_tokens <= MAX_IMAGE_TOKENS:
        raise CodecError(
            f"{where}: expected_tokens must be between 1 and {MAX_IMAGE_TOKENS}, "
            f"got {expected_tokens}"
        )
    return ImageInput(position, expected_tokens, bytes(data), fmt, where)


def _datum_from_proto(msg: Any, index: int, no_images: str | None = NO_IMAGES) -> Datum:
    """Decode one proto Datum: token chunks concatenated (an image chunk adds its
    `expected_tokens` placeholder positions, 0 here), inputs as torch tensors. `no_images`:
    why image chunks are refused (None: accepted)."""
    tokens: list[int] = []
    images: list[ImageInput] = []
    for j, chunk in enumerate(msg.model_input):
        kind = chunk.WhichOneof("chunk")
        what = f"data[{index}].model_input[{j}]"
        if kind == "encoded_text":
            tokens.extend(_frombuffer(chunk.encoded_text.tokens, np.dtype("<i4"), what).tolist())
        elif kind in ("image", "dmel") and no_images is not None:
            raise CodecError(f"{what}: {no_images}")
        elif kind == "image":
            img = chunk.image
            expected = img.expected_tokens if img.HasField("expected_tokens") else None
            image = image_input(img.data, img.format, expected, len(tokens), what)
            images.append(image)
            tokens.extend([0] * image.num_tokens)
        elif kind == "dmel":
            raise CodecError(f"{what}: audio (dmel) chunks are not supported by this server")
        else:
            raise CodecError(f"{what}: empty chunk")
    inputs = {
        key: _tensor_from_proto(tensor, key, f"data[{index}].loss_fn_inputs[{key!r}]")
        for key, tensor in msg.loss_fn_inputs.items()
    }
    input_spans = _spans(msg.model_input_spans, f"data[{index}].model_input_spans")
    target_spans = _spans(msg.loss_fn_input_spans, f"data[{index}].loss_fn_input_spans")
    if (input_spans is None) != (target_spans is None):
        raise CodecError(
            f"data[{index}]: provenance comes as a pair: model_input_spans and "
            "loss_fn_input_spans are both set or both empty"
        )
    return Datum(tokens, inputs, input_spans, target_spans, images)


# Spans per datum field: far above any real datum (one span per turn and sequence).
MAX_SPANS = 1 << 16


def _spans(msgs: Any, what: str) -> list[ProvenanceSpan] | None:
    """Provenance spans of one datum field (None when the field has none)."""
    if not msgs:
        return None
    if len(msgs) > MAX_SPANS:
        raise CodecError(f"{what} has {len(msgs)} spans; at most {MAX_SPANS}")
    spans = []
    for k, msg in enumerate(msgs):
        arm = msg.WhichOneof("span")
        if arm is None:
            raise CodecError(f"{what}[{k}] is neither prompt_tokens nor sampled_tokens")
        span = getattr(msg, arm)
        if not span.sequence_id:
            raise CodecError(f"{what}[{k}].sequence_id is empty")
        if span.offset < 0 or span.length < 0:
            raise CodecError(f"{what}[{k}]: offset and length must be >= 0")
        spans.append(
            ProvenanceSpan(span.sequence_id, span.offset, span.length, arm == "sampled_tokens")
        )
    return spans


def parse_forward_backward(body: bytes, content_encoding: str | None = None) -> Any:
    """Parse a `POST /api/v1/forward_backward` body (protobuf, maybe zstd-compressed) into the
    proto message, without decoding its tensors: the caller can check `model_id` and
    `seq_id` first, so that a request with bad data still accounts for its seq_id."""
    raw = decompress_body(body, content_encoding)
    msg = proto.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CodecError(f"malformed ForwardBackwardRequest protobuf: {exc}") from exc
    return msg


def decode_forward_backward(
    body: bytes, content_encoding: str | None = None, *, no_images: str | None = NO_IMAGES
) -> ForwardBackwardRequestData:
    """Decode a `POST /api/v1/forward_backward` body (protobuf, maybe zstd-compressed)."""
    return forward_backward_data(
        parse_forward_backward(body, content_encoding), no_images=no_images
    )


def forward_backward_data(
    msg: Any, *, no_images: str | None = NO_IMAGES
) -> ForwardBackwardRequestData:
    """Decode a parsed ForwardBackwardRequest: config maps and every datum's tensors.
    `no_images`: why image chunks are refused (None when the model takes images)."""
    config: dict[str, float] = dict(msg.loss_fn_config.items())
    text: dict[str, str] = {}
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind == "number":
            config[key] = value.number
        elif kind == "text":
            config.pop(key, None)
            text[key] = value.text
    return ForwardBackwardRequestData(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        loss_fn=msg.loss_fn,
        loss_fn_config=config,
        loss_fn_config_text=text,
        forward_only=msg.forward_only,
        data=[_datum_from_proto(d, i, no_images) for i, d in enumerate(msg.data)],
    )


# --------------------------------------------------------------------------------------------
# JSON helpers (TensorData and ModelInput as sent in /asample)


def _json_list(d: Mapping[str, Any], key: str, *, ints: bool, what: str) -> list[Any]:
    """A JSON list of numbers (ints only when `ints`); booleans are refused."""
    value = d.get(key)
    if not isinstance(value, list):
        raise CodecError(f"{what}.{key} must be a list")
    for v in value:
        ok = isinstance(v, int) if ints else isinstance(v, int | float)
        if isinstance(v, bool) or not ok:
            kind = "an integer" if ints else "a number"
            raise CodecError(f"{what}.{key} entries must each be {kind}, got {v!r}")
    return value


def _int64s(values: list[int], what: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.int64)
    except OverflowError as exc:
        raise CodecError(f"{what}: value out of range for int64") from exc


def tensor_from_json(
    d: Mapping[str, Any],
    *,
    pad_value: float = 0,
    what: str = "tensor",
    max_cells: int = MAX_TENSOR_CELLS,
) -> torch.Tensor:
    """Decode TensorData JSON (`data`, `dtype`, `shape`?, CSR indices?) to a torch tensor.

    The declared dtype is kept (int64 or float32). CSR cells not listed take `pad_value`
    (0 for weights/targets, -1 for `target_prompt_logprobs`).
    """
    if not isinstance(d, Mapping):
        raise CodecError(f"{what} must be an object")
    dtype = d.get("dtype")
    if dtype not in ("int64", "float32"):
        raise CodecError(f"{what}.dtype must be 'int64' or 'float32', got {dtype!r}")
    np_dtype = np.dtype(np.int64 if dtype == "int64" else np.float32)
    data = _json_list(d, "data", ints=dtype == "int64", what=what)
    shape_raw = d.get("shape")
    shape = [] if shape_raw is None else _json_list(d, "shape", ints=True, what=what)
    try:
        values = np.asarray(data, dtype=np_dtype).reshape(-1)
    except OverflowError as exc:
        raise CodecError(f"{what}.data: value out of range for {dtype}") from exc
    if d.get("sparse_crow_indices") is not None:
        crow = _int64s(_json_list(d, "sparse_crow_indices", ints=True, what=what), what)
        col = _int64s(_json_list(d, "sparse_col_indices", ints=True, what=what), what)
        arr = _csr_to_dense(values, crow, col, shape, pad_value, what, max_cells)
    else:
        arr = values.reshape(_check_shape(shape, values.size, what))
    return torch.from_numpy(np.ascontiguousarray(arr))


@dataclass(frozen=True)
class CsrLayout:
    """The sparse layout of a request tensor, reused for its response (same cells)."""

    crow_indices: np.ndarray
    col_indices: np.ndarray


def target_prompt_ids(
    d: Mapping[str, Any], max_cells: int = MAX_OUTPUT_CELLS
) -> tuple[torch.Tensor, CsrLayout | None]:
    """`target_prompt_logprobs` of /asample: a 2-D int64 TensorData, dense or CSR (unlisted
    cells are -1, "no request"). Returns the dense ids and the CSR layout if it had one."""
    what = "target_prompt_logprobs"
    if not isinstance(d, Mapping):
        raise CodecError(f"{what} must be an object")
    if d.get("dtype") != "int64":
        raise CodecError(f"{what} must be an int64 tensor of token ids, got {d.get('dtype')!r}")
    shape = d.get("shape")
    if not isinstance(shape, list) or len(shape) != 2:
        raise CodecError(f"{what} must be 2-D, [len(prompt) - 1, K], got shape {shape!r}")
    ids = tensor_from_json(d, pad_value=-1, what=what, max_cells=max_cells)
    layout = None
    if d.get("sparse_crow_indices") is not None:
        layout = CsrLayout(
            _int64s(d["sparse_crow_indices"], what), _int64s(d["sparse_col_indices"], what)
        )
    return ids, layout


def model_input(
    d: Mapping[str, Any], *, what: str = "prompt", no_images: str | None = NO_IMAGES
) -> tuple[list[int], list[ImageInput]]:
    """Tokens and images of a ModelInput JSON: `encoded_text` chunks' tokens in order, and
    each `image` chunk (`data` base64, `format`, `expected_tokens`) as `expected_tokens`
    placeholder positions (0 here). `no_images`: why image chunks are refused (None: they
    are accepted). Errors name the chunk (`prompt.chunks[1]`)."""
    if not isinstance(d, Mapping) or not isinstance(d.get("chunks"), list):
        raise CodecError(f"{what} must be an object with a 'chunks' list")
    tokens: list[int] = []
    images: list[ImageInput] = []
    for j, chunk in enumerate(d["chunks"]):
        where = f"{what}.chunks[{j}]"
        if not isinstance(chunk, Mapping):
            raise CodecError(f"{where} must be an object")
        kind = chunk.get("type", "encoded_text")
        if kind in ("image", "image_asset_pointer", "dmel") and no_images is not None:
            raise CodecError(f"{where}: {no_images}")
        if kind == "image_asset_pointer":
            raise CodecError(
                f"{where}: image_asset_pointer chunks are not supported; send the image "
                "bytes (ImageChunk)"
            )
        if kind == "dmel":
            raise CodecError(f"{where}: audio (dmel) chunks are not supported by this server")
        if kind == "image":
            raw = chunk.get("data")
            if not isinstance(raw, str):
                raise CodecError(f"{where}: image data must be a base64 string")
            if len(raw) > (MAX_IMAGE_BYTES // 3 + 1) * 4:
                raise CodecError(f"{where}: image data exceeds {MAX_IMAGE_BYTES} bytes")
            try:
                data = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise CodecError(f"{where}: image data is not valid base64") from exc
            image = image_input(
                data, chunk.get("format"), chunk.get("expected_tokens"), len(tokens), where
            )
            images.append(image)
            tokens.extend([0] * image.num_tokens)
            continue
        if kind != "encoded_text":
            raise CodecError(f"{where}: unsupported chunk type {kind!r}")
        tokens.extend(_json_list(chunk, "tokens", ints=True, what=where))
    return tokens, images


def model_input_tokens(d: Mapping[str, Any]) -> list[int]:
    """Token ids of a ModelInput JSON: the `encoded_text` chunks concatenated in order."""
    if not isinstance(d, Mapping) or not isinstance(d.get("chunks"), list):
        raise CodecError("model input must be an object with a 'chunks' list")
    tokens: list[int] = []
    for j, chunk in enumerate(d["chunks"]):
        if not isinstance(chunk, Mapping):
            raise CodecError(f"chunks[{j}] must be an object")
        kind = chunk.get("type", "encoded_text")
        if kind in ("image", "image_asset_pointer", "dmel"):
            raise CodecError("image inputs are not supported by this server")
        if kind != "encoded_text":
            raise CodecError(f"chunks[{j}]: unsupported chunk type {kind!r}")
        tokens.extend(_json_list(chunk, "tokens", ints=True, what=f"chunks[{j}]"))
    return tokens


# --------------------------------------------------------------------------------------------
# Response side: model types -> bytes


def _wire_dtype(dtype: torch.dtype) -> int:
    """Proto DType for an output tensor dtype: bf16 and int32 as is, other floats as float32,
    other integers (and bool) as int64."""
    if dtype == torch.bfloat16:
        return proto.DTYPE_BFLOAT16
    if dtype == torch.int32:
        return proto.DTYPE_INT32
    return proto.DTYPE_FLOAT32 if dtype.is_floating_point else proto.DTYPE_INT64


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of `t` in its wire dtype (see `_wire_dtype`)."""
    t = t.detach().to("cpu").contiguous()
    wire = _wire_dtype(t.dtype)
    if wire == proto.DTYPE_BFLOAT16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    if wire == proto.DTYPE_INT32:
        return t.numpy().astype("<i4").tobytes()
    if wire == proto.DTYPE_FLOAT32:
        return t.to(torch.float32).numpy().astype("<f4").tobytes()
    return t.to(torch.int64).numpy().astype("<i8").tobytes()


def _signature(outputs: Mapping[str, torch.Tensor]) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """Per-field (name, wire dtype, trailing shape): datums that share it share an ArrayRecord."""
    return tuple(
        (name, _wire_dtype(outputs[name].dtype), tuple(outputs[name].shape[1:]))
        for name in sorted(outputs)
    )


def encode_forward_backward_output(
    out: ForwardBackwardOutput, loss_fn_output_type: str = "ArrayRecord"
) -> bytes:
    """Encode a ForwardBackwardOutput as `tinker_public.ForwardBackwardOutput` bytes.

    Consecutive datums whose fields agree on dtype and trailing shape go into one ArrayRecord
    (normally there is exactly one); the SDK concatenates records in order. Every datum must
    have the same field names, or the SDK would mis-align them.
    """
    msg = proto.ForwardBackwardOutput(loss_fn_output_type=loss_fn_output_type)
    for key, value in out.metrics.items():
        msg.metrics[key] = float(value)
    datums = out.loss_fn_outputs
    if datums:
        names = set(datums[0])
        for i, d in enumerate(datums):
            if set(d) != names:
                raise ValueError(f"loss_fn_outputs[{i}] fields {sorted(d)} != {sorted(names)}")
    groups: list[list[Mapping[str, torch.Tensor]]] = []
    last_sig: object = None
    for d in datums:
        sig = _signature(d)
        if not groups or sig != last_sig:
            groups.append([])
            last_sig = sig
        groups[-1].append(d)
    for group in groups:
        record = msg.loss_fn_outputs.add(type_tag=loss_fn_output_type, num_datums=len(group))
        for name in sorted(group[0]):
            bt = record.fields[name]
            buffers: list[bytes] = []
            offsets = [0]
            for d in group:
                buf = _tensor_bytes(d[name])
                buffers.append(buf)
                offsets.append(offsets[-1] + len(buf))
            bt.dtype = _wire_dtype(group[0][name].dtype)
            bt.data = b"".join(buffers)
            bt.offsets = np.asarray(offsets, dtype="<i8").tobytes()
            bt.trailing_shape.extend(group[0][name].shape[1:])
    return msg.SerializeToString()


def _encode_topk(rows: list[list[tuple[int, float]] | None], k: int, target: Any) -> None:
    """Fill a TopkLogprobs message: row-major (length, k), empty cells (0, -99999.0)."""
    ids = np.full((len(rows), k), TOPK_EMPTY_TOKEN, dtype="<i4")
    lps = np.full((len(rows), k), TOPK_EMPTY_LOGPROB, dtype="<f4")
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate((row or [])[:k]):
            ids[i, j] = token
            lps[i, j] = logprob
    target.token_ids = ids.tobytes()
    target.logprobs = lps.tobytes()
    target.k = k
    target.length = len(rows)


def _fill_tensor(target: Any, t: torch.Tensor, layout: CsrLayout | None = None) -> None:
    """Fill a proto `Tensor` from a 2-D tensor, dense or (given a layout) CSR with the
    layout's cells."""
    wire = _wire_dtype(t.dtype)
    target.dtype = wire
    target.shape.extend(t.shape)
    if layout is None:
        target.dense = _tensor_bytes(t)
        return
    rows = np.repeat(np.arange(t.shape[0]), np.diff(layout.crow_indices))
    values = t.detach().cpu()[torch.from_numpy(rows), torch.from_numpy(layout.col_indices)]
    target.sparse_csr.values = _tensor_bytes(values)
    target.sparse_csr.crow_indices = layout.crow_indices.astype("<i8").tobytes()
    target.sparse_csr.col_indices = layout.col_indices.astype("<i8").tobytes()


def encode_sample_response(
    out: SampleOutput,
    *,
    prompt_logprobs_requested: bool,
    topk_prompt_k: int,
    topk_sample_k: int = 0,
    target_layout: CsrLayout | None = None,
) -> bytes:
    """Encode a SampleOutput as `tinker_public.SampleResponse` bytes.

    Logprobs are always sent (RL code relies on them). Prompt logprobs are sent only when
    requested, NaN where unscored (the SDK turns NaN into None); top-k prompt rows that are None
    (position 0) become all-sentinel rows, which the SDK turns back into None. Per-token top-k
    sampled logprobs are sent when `topk_sample_k > 0`. `target_prompt_logprobs` (float32) is
    sent with the request's shape, and CSR with the request's cells when `target_layout` is
    given; `prompt_alt_tokens` as dense int64 tokens and float32 logprobs.
    """
    msg = proto.SampleResponse()
    for seq in out.sequences:
        if len(seq.logprobs) != len(seq.tokens):
            raise ValueError("a sampled sequence needs one logprob per token")
        if seq.stop_reason not in ("stop", "length"):
            raise ValueError(f"unknown stop_reason {seq.stop_reason!r}")
        seq_msg = msg.sequences.add(
            stop_reason=(
                proto.STOP_REASON_STOP if seq.stop_reason == "stop" else proto.STOP_REASON_LENGTH
            ),
            tokens=np.asarray(seq.tokens, dtype="<i4").tobytes(),
            logprobs=np.asarray(seq.logprobs, dtype="<f4").tobytes(),
        )
        if topk_sample_k > 0 and seq.topk_logprobs is not None:
            if len(seq.topk_logprobs) != len(seq.tokens):
                raise ValueError("a sampled sequence needs one top-k row per token")
            rows: list[list[tuple[int, float]] | None] = list(seq.topk_logprobs)
            _encode_topk(rows, topk_sample_k, seq_msg.topk_sampled_logprobs)
    if prompt_logprobs_requested and out.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in out.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    if topk_prompt_k > 0 and out.topk_prompt_logprobs is not None:
        _encode_topk(out.topk_prompt_logprobs, topk_prompt_k, msg.topk_prompt_logprobs)
    if out.target_prompt_logprobs is not None:
        _fill_tensor(msg.target_prompt_logprobs, out.target_prompt_logprobs.float(), target_layout)
    if out.prompt_alt_tokens is not None and out.prompt_alt_logprobs is not None:
        _fill_tensor(msg.prompt_alt_tokens.tokens, out.prompt_alt_tokens.long())
        _fill_tensor(msg.prompt_alt_tokens.logprobs, out.prompt_alt_logprobs.float())
    return msg.SerializeToString()
