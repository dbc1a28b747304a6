"""Wire codec and JSON schemas, checked against the real tinker SDK (0.38) as the reference.

Requests are built and serialized with the SDK's own types and converters, then decoded with
ours; our responses are encoded and then decoded with the SDK's `response_conv`.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from pydantic import BaseModel, ValidationError

tinker = pytest.importorskip("tinker")

from google.protobuf import descriptor_pb2  # noqa: E402
from tinker import types as T  # noqa: E402
from tinker.lib.public_interfaces.sampling_client import _tensor_data_to_model  # noqa: E402
from tinker.proto import request_conv, response_conv  # noqa: E402
from tinker.proto import tinker_public_pb2 as sdk_pb  # noqa: E402

from tinkerd.api import codec, proto, schemas  # noqa: E402
from tinkerd.api.codec import CodecError  # noqa: E402
from tinkerd.model.types import (  # noqa: E402
    ForwardBackwardOutput,
    SampledSequence,
    SampleOutput,
)

# --------------------------------------------------------------------------------------------
# helpers


def sdk_fwdbwd_body(
    data: list[Any],
    *,
    loss_fn: str = "cross_entropy",
    config: dict[str, float | str] | None = None,
    seq_id: int = 1,
    model_id: str = "s:train:0",
    compress: bool = False,
) -> tuple[bytes, str | None]:
    """The exact body (and Content-Encoding) the SDK's resources/training.py would send."""
    request = T.ForwardBackwardRequest(
        forward_backward_input=T.ForwardBackwardInput(
            data=data, loss_fn=loss_fn, loss_fn_config=config
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    body = request_conv.forward_backward_request_to_proto(request).SerializeToString()
    if compress:
        return zstandard.ZstdCompressor().compress(body), "zstd"
    return body, None


def sdk_datum(tokens: list[int], **inputs: Any) -> Any:
    return T.Datum(model_input=T.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def sdk_json(model: BaseModel) -> dict[str, Any]:
    """How the SDK puts a request model on the wire (resources/*.py)."""
    return json.loads(json.dumps(model.model_dump(exclude_none=True, mode="json")))


def ours_json(model: BaseModel) -> dict[str, Any]:
    """How the server should put a response model on the wire."""
    return json.loads(model.model_dump_json(exclude_none=True))


# --------------------------------------------------------------------------------------------
# proto schema


def test_schema_matches_sdk_descriptor() -> None:
    sdk = descriptor_pb2.FileDescriptorProto()
    sdk_pb.DESCRIPTOR.CopyToProto(sdk)
    ours = descriptor_pb2.FileDescriptorProto()
    proto.FILE_DESCRIPTOR.CopyToProto(ours)
    assert ours.package == sdk.package == "tinker_public"
    assert ours.name != sdk.name
    assert {m.name: m for m in ours.message_type} == {m.name: m for m in sdk.message_type}
    assert {e.name: e for e in ours.enum_type} == {e.name: e for e in sdk.enum_type}


def test_messages_interoperate_with_sdk_classes() -> None:
    msg = proto.SampleResponse(prompt_cache_hit_tokens=3)
    msg.sequences.add(stop_reason=proto.STOP_REASON_LENGTH, tokens=b"\x01\x00\x00\x00")
    back = sdk_pb.SampleResponse.FromString(msg.SerializeToString())
    assert back.prompt_cache_hit_tokens == 3
    assert back.sequences[0].stop_reason == sdk_pb.STOP_REASON_LENGTH
    assert not back.HasField("prompt_logprobs")


# --------------------------------------------------------------------------------------------
# forward_backward request decoding


def test_decode_cross_entropy_request() -> None:
    body, enc = sdk_fwdbwd_body(
        [
            sdk_datum([5, 6, 7], target_tokens=[6, 7, 8], weights=[0.0, 1.0, 1.0]),
            sdk_datum([1, 2**31 - 1], target_tokens=[2, 3], weights=[1.0, 0.5]),
        ],
        seq_id=7,
        model_id="abc:train:3",
    )
    req = codec.decode_forward_backward(body, enc)
    assert (req.model_id, req.seq_id, req.loss_fn, req.forward_only) == (
        "abc:train:3",
        7,
        "cross_entropy",
        False,
    )
    assert req.loss_fn_config == {} and req.loss_fn_config_text == {}
    assert [d.tokens for d in req.data] == [[5, 6, 7], [1, 2**31 - 1]]
    tt = req.data[0].loss_fn_inputs["target_tokens"]
    assert tt.dtype == torch.int64 and tt.tolist() == [6, 7, 8]
    w = req.data[1].loss_fn_inputs["weights"]
    assert w.dtype == torch.float32 and w.tolist() == [1.0, 0.5]


def test_decode_rl_inputs_and_config_merge() -> None:
    body, _ = sdk_fwdbwd_body(
        [
            sdk_datum(
                [1, 2, 3],
                target_tokens=np.array([2, 3, 4]),
                logprobs=torch.tensor([-1.0, -2.0, -0.5]),
                advantages=[0.0, 1.5, -1.5],
            )
        ],
        loss_fn="ppo",
        config={"clip_low_threshold": 0.7, "clip_high_threshold": 1.3, "loss_id": "abc"},
    )
    req = codec.decode_forward_backward(body, None)
    assert req.loss_fn == "ppo"
    assert req.loss_fn_config == pytest.approx(
        {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}
    )
    assert req.loss_fn_config_text == {"loss_id": "abc"}
    inputs = req.data[0].loss_fn_inputs
    assert inputs["logprobs"].tolist() == [-1.0, -2.0, -0.5]
    assert inputs["advantages"].dtype == torch.float32
    assert inputs["target_tokens"].dtype == torch.int64


def test_decode_v2_config_wins_and_legacy_only_config() -> None:
    msg = proto.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="dro", forward_only=True)
    msg.loss_fn_config["beta"] = 1.0
    msg.loss_fn_config["legacy"] = 2.0
    msg.loss_fn_config_v2["beta"].number = 0.05
    req = codec.decode_forward_backward(msg.SerializeToString(), "identity")
    assert req.loss_fn_config == {"beta": 0.05, "legacy": 2.0}
    assert req.forward_only is True
    assert req.data == []


def test_decode_csr_2d_inputs() -> None:
    target = torch.zeros(6, 4, dtype=torch.int64)
    target[1, 2] = 9
    target[4, 0] = 3
    weights = torch.zeros(6, 4)
    weights[1, 2] = 0.25
    weights[4, 0] = -2.0
    datum = sdk_datum(list(range(6)), target_tokens=target, weights=weights)
    # The SDK chose CSR for these (mostly zero) 2-D tensors: check we really test that path.
    assert datum.loss_fn_inputs["target_tokens"].sparse_crow_indices is not None
    assert datum.loss_fn_inputs["weights"].sparse_crow_indices is not None
    body, enc = sdk_fwdbwd_body([datum])
    inputs = codec.decode_forward_backward(body, enc).data[0].loss_fn_inputs
    assert inputs["target_tokens"].dtype == torch.int64
    assert torch.equal(inputs["target_tokens"], target)
    assert torch.equal(inputs["weights"], weights)


def test_decode_dense_2d_input() -> None:
    weights = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    body, _ = sdk_fwdbwd_body([sdk_datum([1, 2, 3, 4], weights=weights)])
    got = codec.decode_forward_backward(body, None).data[0].loss_fn_inputs["weights"]
    assert torch.equal(got, weights)


def test_decode_zstd_body() -> None:
    tokens = list(range(500))
    body, enc = sdk_fwdbwd_body(
        [sdk_datum(tokens, target_tokens=[*tokens[1:], 0], weights=[1.0] * 500)], compress=True
    )
    assert enc == "zstd"
    req = codec.decode_forward_backward(body, "zstd")
    assert req.data[0].tokens == tokens
    assert req.data[0].loss_fn_inputs["weights"].sum().item() == 500.0


def test_decode_empty_shape_is_inferred_1d() -> None:
    td = T.TensorData(data=[0.5, 1.5, 2.5], dtype="float32")  # shape left unset
    body, _ = sdk_fwdbwd_body([sdk_datum([1, 2, 3], weights=td)])
    w = codec.decode_forward_backward(body, None).data[0].loss_fn_inputs["weights"]
    assert w.shape == (3,) and w.tolist() == [0.5, 1.5, 2.5]


def test_decode_casts_to_model_dtypes() -> None:
    body, _ = sdk_fwdbwd_body(
        [
            sdk_datum(
                [1, 2],
                target_tokens=T.TensorData(data=[3.0, 4.0], dtype="float32", shape=[2]),
                weights=T.TensorData(data=[1, 0], dtype="int64", shape=[2]),
            )
        ]
    )
    inputs = codec.decode_forward_backward(body, None).data[0].loss_fn_inputs
    assert inputs["target_tokens"].dtype == torch.int64 and inputs["target_tokens"].tolist() == [
        3,
        4,
    ]
    assert inputs["weights"].dtype == torch.float32 and inputs["weights"].tolist() == [1.0, 0.0]


def test_decode_bf16_and_int32_tensors() -> None:
    msg = proto.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.array([1, 2], "<i4").tobytes()
    w = d.loss_fn_inputs["weights"]
    w.dtype = proto.DTYPE_BFLOAT16
    w.dense = torch.tensor([1.5, -2.0], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dtype = proto.DTYPE_INT32
    t.dense = np.array([7, 8], "<i4").tobytes()
    inputs = codec.decode_forward_backward(msg.SerializeToString(), None).data[0].loss_fn_inputs
    assert inputs["weights"].tolist() == [1.5, -2.0]
    assert inputs["target_tokens"].dtype == torch.int64 and inputs["target_tokens"].tolist() == [
        7,
        8,
    ]


def test_decode_multiple_chunks_concatenate() -> None:
    mi = T.ModelInput(chunks=[T.EncodedTextChunk(tokens=[1, 2]), T.EncodedTextChunk(tokens=[3])])
    body, _ = sdk_fwdbwd_body([T.Datum(model_input=mi, loss_fn_inputs={"weights": [1.0] * 3})])
    assert codec.decode_forward_backward(body, None).data[0].tokens == [1, 2, 3]


@pytest.mark.parametrize(
    "chunk",
    [
        T.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4),
        T.DmelChunk(dmel=b"abc"),
    ],
)
def test_decode_image_chunk_refused(chunk: Any) -> None:
    mi = T.ModelInput(chunks=[T.EncodedTextChunk(tokens=[1]), chunk])
    body, _ = sdk_fwdbwd_body([T.Datum(model_input=mi, loss_fn_inputs={})])
    with pytest.raises(CodecError, match="image inputs are not supported by this server"):
        codec.decode_forward_backward(body, None)


def _one_tensor_request(tensor: Any) -> bytes:
    msg = proto.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.array([1, 2], "<i4").tobytes()
    d.loss_fn_inputs["weights"].CopyFrom(tensor)
    return msg.SerializeToString()


def _csr(values: list[float], crow: list[int], col: list[int], shape: list[int]) -> Any:
    t = proto.Tensor(dtype=proto.DTYPE_FLOAT32, shape=shape)
    t.sparse_csr.values = np.array(values, "<f4").tobytes()
    t.sparse_csr.crow_indices = np.array(crow, "<i8").tobytes()
    t.sparse_csr.col_indices = np.array(col, "<i8").tobytes()
    return t


@pytest.mark.parametrize(
    ("body", "encoding", "match"),
    [
        (b"\xff\xff\xff\xff", None, "malformed ForwardBackwardRequest"),
        (b"\x0a\x05ab", None, "malformed ForwardBackwardRequest"),  # truncated string
        (b"not zstd at all", "zstd", "not valid zstd"),
        (b"", "br", "unsupported Content-Encoding"),
        (
            _one_tensor_request(proto.Tensor(dtype=proto.DTYPE_FLOAT32, dense=b"\x00" * 7)),
            None,
            "not a multiple",
        ),
        (
            _one_tensor_request(
                proto.Tensor(dtype=proto.DTYPE_FLOAT32, dense=b"\x00" * 8, shape=[3])
            ),
            None,
            "does not match",
        ),
        (_one_tensor_request(proto.Tensor(dtype=9, dense=b"")), None, "unsupported tensor dtype"),
        (_one_tensor_request(_csr([1.0], [0, 1, 1], [5], [2, 2])), None, "out of range"),
        (_one_tensor_request(_csr([1.0], [0, 1], [0], [2, 2])), None, "crow_indices has"),
        (_one_tensor_request(_csr([1.0], [0, 2, 1], [0], [2, 2])), None, "crow_indices must"),
        (_one_tensor_request(_csr([1.0], [0, 1], [0], [1])), None, "2-D shape"),
    ],
    ids=lambda v: "body" if isinstance(v, bytes) else None,
)
def test_decode_errors(body: bytes, encoding: str | None, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        codec.decode_forward_backward(body, encoding)


def test_decode_empty_chunk_and_ragged_tokens() -> None:
    msg = proto.ForwardBackwardRequest(model_id="m", seq_id=1)
    msg.data.add().model_input.add()
    with pytest.raises(CodecError, match="empty chunk"):
        codec.decode_forward_backward(msg.SerializeToString(), None)
    msg = proto.ForwardBackwardRequest(model_id="m", seq_id=1)
    msg.data.add().model_input.add().encoded_text.tokens = b"\x01\x00\x00"
    with pytest.raises(CodecError, match="model_input"):
        codec.decode_forward_backward(msg.SerializeToString(), None)


def test_decompress_cap() -> None:
    body = zstandard.ZstdCompressor().compress(b"\x00" * 10_000)
    with pytest.raises(CodecError, match="exceeds"):
        codec.decompress_body(body, "zstd", max_size=1000)
    assert codec.decompress_body(body, "zstd") == b"\x00" * 10_000


# --------------------------------------------------------------------------------------------
# forward_backward output encoding


def test_encode_forward_backward_output_1d() -> None:
    out = ForwardBackwardOutput(
        loss_fn_outputs=[
            {"logprobs": torch.tensor([-1.0, -2.0, -3.0]), "elementwise_loss": torch.ones(3)},
            {"logprobs": torch.tensor([-0.5]), "elementwise_loss": torch.tensor([0.5])},
            {"logprobs": torch.zeros(0), "elementwise_loss": torch.zeros(0)},
        ],
        metrics={"loss:sum": 6.5, "tokens:sum": 4},
    )
    got = response_conv.deserialize_forward_backward_output(
        codec.encode_forward_backward_output(out)
    )
    assert got.loss_fn_output_type == "ArrayRecord"
    assert got.metrics == {"loss:sum": 6.5, "tokens:sum": 4.0}
    assert len(got.loss_fn_outputs) == 3
    assert got.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0, -3.0]
    assert got.loss_fn_outputs[0]["logprobs"].shape == [3]
    assert got.loss_fn_outputs[0]["logprobs"].dtype == "float32"
    assert got.loss_fn_outputs[1]["elementwise_loss"].tolist() == [0.5]
    assert got.loss_fn_outputs[2]["logprobs"].tolist() == []
    # The result converts to torch as users do it.
    assert torch.equal(got.loss_fn_outputs[0]["elementwise_loss"].to_torch(), torch.ones(3))


def test_encode_forward_backward_output_2d_and_ragged_trailing() -> None:
    a = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    b = torch.arange(4, dtype=torch.float32).reshape(2, 2) * -1
    c = torch.arange(3, dtype=torch.float32).reshape(1, 3)
    out = ForwardBackwardOutput(
        loss_fn_outputs=[{"logprobs": a}, {"logprobs": b}, {"logprobs": c}],
        metrics={"loss:sum": 1.0},
    )
    body = codec.encode_forward_backward_output(out)
    raw = sdk_pb.ForwardBackwardOutput.FromString(body)
    assert [r.num_datums for r in raw.loss_fn_outputs] == [2, 1]
    bt = raw.loss_fn_outputs[0].fields["logprobs"]
    assert list(bt.trailing_shape) == [2]
    assert np.frombuffer(bt.offsets, "<i8").tolist() == [0, 24, 40]
    got = response_conv.deserialize_forward_backward_output(body)
    assert [o["logprobs"].shape for o in got.loss_fn_outputs] == [[3, 2], [2, 2], [1, 3]]
    assert got.loss_fn_outputs[0]["logprobs"].to_numpy().tolist() == a.tolist()
    assert got.loss_fn_outputs[1]["logprobs"].to_numpy().tolist() == b.tolist()
    assert got.loss_fn_outputs[2]["logprobs"].to_numpy().tolist() == c.tolist()


def test_encode_forward_backward_output_dtypes() -> None:
    out = ForwardBackwardOutput(
        loss_fn_outputs=[
            {
                "bf": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
                "i32": torch.tensor([3, 4], dtype=torch.int32),
                "i64": torch.tensor([5, 6]),
                "f64": torch.tensor([0.25, 0.5], dtype=torch.float64),
            }
        ],
        metrics={},
    )
    got = response_conv.deserialize_forward_backward_output(
        codec.encode_forward_backward_output(out, loss_fn_output_type="tinker:ArrayRecord")
    )
    assert got.loss_fn_output_type == "ArrayRecord"
    o = got.loss_fn_outputs[0]
    assert (o["bf"].dtype, o["bf"].tolist()) == ("float32", [1.5, -2.0])
    assert (o["i32"].dtype, o["i32"].tolist()) == ("int64", [3, 4])
    assert (o["i64"].dtype, o["i64"].tolist()) == ("int64", [5, 6])
    assert (o["f64"].dtype, o["f64"].tolist()) == ("float32", [0.25, 0.5])


def test_encode_forward_backward_output_empty_and_mismatch() -> None:
    got = response_conv.deserialize_forward_backward_output(
        codec.encode_forward_backward_output(ForwardBackwardOutput([], {"loss:sum": 0.0}))
    )
    assert got.loss_fn_outputs == [] and got.metrics == {"loss:sum": 0.0}
    bad = ForwardBackwardOutput([{"logprobs": torch.zeros(1)}, {"other": torch.zeros(1)}], {})
    with pytest.raises(ValueError, match="fields"):
        codec.encode_forward_backward_output(bad)


# --------------------------------------------------------------------------------------------
# sample response encoding


def test_encode_sample_response_basic() -> None:
    out = SampleOutput(
        sequences=[
            SampledSequence(tokens=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3], stop_reason="stop"),
            SampledSequence(tokens=[], logprobs=[], stop_reason="length"),
        ],
        prompt_logprobs=[None, -1.0, -2.0],
    )
    got = response_conv.deserialize_sample_response(
        codec.encode_sample_response(out, prompt_logprobs_requested=False, topk_prompt_k=0)
    )
    assert [s.stop_reason for s in got.sequences] == ["stop", "length"]
    assert got.sequences[0].tokens == [5, 6, 7]
    assert got.sequences[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert got.sequences[1].tokens == []
    assert got.prompt_logprobs is None  # not requested: not sent
    assert got.topk_prompt_logprobs is None


def test_encode_sample_response_prompt_logprobs_and_topk() -> None:
    out = SampleOutput(
        sequences=[SampledSequence(tokens=[9], logprobs=[-0.5], stop_reason="length")],
        prompt_logprobs=[None, -1.25, None, -3.0],
        topk_prompt_logprobs=[
            None,
            [(11, -0.5), (12, -1.5)],
            [(13, -0.25)],
            [(14, -0.1), (15, -2.0), (16, -9.0)],  # more than k: cut to k
        ],
    )
    got = response_conv.deserialize_sample_response(
        codec.encode_sample_response(out, prompt_logprobs_requested=True, topk_prompt_k=2)
    )
    assert got.prompt_logprobs == [None, -1.25, None, -3.0]
    assert got.topk_prompt_logprobs == [
        None,
        [(11, -0.5), (12, -1.5)],
        [(13, -0.25)],
        [(14, pytest.approx(-0.1)), (15, -2.0)],
    ]
    assert got.sequences[0].logprobs == [-0.5]


def test_encode_sample_response_validates() -> None:
    bad = SampleOutput(
        sequences=[SampledSequence(tokens=[1, 2], logprobs=[0.0], stop_reason="stop")]
    )
    with pytest.raises(ValueError, match="one logprob per token"):
        codec.encode_sample_response(bad, prompt_logprobs_requested=False, topk_prompt_k=0)
    bad = SampleOutput(sequences=[SampledSequence(tokens=[], logprobs=[], stop_reason="eos")])
    with pytest.raises(ValueError, match="stop_reason"):
        codec.encode_sample_response(bad, prompt_logprobs_requested=False, topk_prompt_k=0)


def test_encode_sample_response_topk_sampled_logprobs() -> None:
    """Per-sequence top-k rows decode through the SDK as `topk_logprobs`; rows shorter than k
    are padded with sentinels, which the SDK strips; not sent unless asked for."""
    out = SampleOutput(
        sequences=[
            SampledSequence(
                tokens=[3, 4],
                logprobs=[-0.5, -1.0],
                stop_reason="length",
                topk_logprobs=[[(3, -0.5), (7, -1.5), (8, -2.5)], [(9, -0.25)]],
            ),
            SampledSequence(
                tokens=[5],
                logprobs=[-0.125],
                stop_reason="stop",
                topk_logprobs=[[(5, -0.125), (6, -3.0)]],
            ),
        ]
    )
    got = response_conv.deserialize_sample_response(
        codec.encode_sample_response(
            out, prompt_logprobs_requested=False, topk_prompt_k=0, topk_sample_k=2
        )
    )
    assert got.sequences[0].topk_logprobs == [[(3, -0.5), (7, -1.5)], [(9, -0.25)]]
    assert got.sequences[1].topk_logprobs == [[(5, -0.125), (6, -3.0)]]
    np_topk = got.sequences[0].topk_logprobs_np
    assert np_topk is not None and np_topk.token_ids.shape == (2, 2)
    plain = response_conv.deserialize_sample_response(
        codec.encode_sample_response(out, prompt_logprobs_requested=False, topk_prompt_k=0)
    )
    assert plain.sequences[0].topk_logprobs is None
    bad = SampleOutput(
        sequences=[
            SampledSequence(
                tokens=[1, 2], logprobs=[0.0, 0.0], stop_reason="stop", topk_logprobs=[[(1, 0.0)]]
            )
        ]
    )
    with pytest.raises(ValueError, match="top-k row per token"):
        codec.encode_sample_response(
            bad, prompt_logprobs_requested=False, topk_prompt_k=0, topk_sample_k=1
        )


def _sdk_sample_body(target: Any) -> dict[str, Any]:
    req = T.SampleRequest(
        prompt=T.ModelInput.from_ints([1, 2, 3, 4, 5]),
        sampling_params=T.SamplingParams(max_tokens=1),
        sampling_session_id="s:sample:0",
        target_prompt_logprobs=_tensor_data_to_model(target),
    )
    return sdk_json(req)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
def test_target_prompt_logprobs_round_trip(sparse: bool) -> None:
    """SDK request tensor -> our ids (+ layout) -> our response -> the SDK's decoder: same
    shape and layout, the logprobs in the named cells, 0.0 in the placeholders."""
    ids = torch.full((4, 3), -1, dtype=torch.int64)
    ids[0, 1] = 7
    ids[2, 0] = 9
    ids[3, 2] = 11
    td = (
        T.TensorData.from_torch_sparse(ids, pad_value=-1)
        if sparse
        else T.TensorData.from_torch(ids)
    )
    body = _sdk_sample_body(td)
    schemas.SampleRequest.model_validate(body)
    got_ids, layout = codec.target_prompt_ids(body["target_prompt_logprobs"])
    assert torch.equal(got_ids, ids)
    assert (layout is not None) == sparse
    values = torch.where(ids >= 0, -ids.float() / 4, torch.zeros(()))
    out = SampleOutput(
        sequences=[SampledSequence([1], [-0.5], "length")], target_prompt_logprobs=values
    )
    resp = response_conv.deserialize_sample_response(
        codec.encode_sample_response(
            out, prompt_logprobs_requested=False, topk_prompt_k=0, target_layout=layout
        )
    )
    tpl = resp.target_prompt_logprobs
    assert tpl is not None and tpl.dtype == "float32" and tpl.shape == [4, 3]
    assert (tpl.sparse_crow_indices is not None) == sparse
    if sparse:
        assert tpl.sparse_crow_indices == td.sparse_crow_indices
        assert tpl.sparse_col_indices == td.sparse_col_indices
        assert list(tpl.data) == [-1.75, -2.25, -2.75]
    assert torch.equal(tpl.to_torch(), values)


def test_target_prompt_logprobs_csr_listing_minus_one() -> None:
    """A CSR cell that lists -1 explicitly is a placeholder: 0.0 in the same cell."""
    layout = codec.CsrLayout(np.array([0, 2, 2]), np.array([0, 1]))
    values = torch.tensor([[-0.5, 0.0], [0.0, 0.0]])
    out = SampleOutput(sequences=[], target_prompt_logprobs=values)
    resp = response_conv.deserialize_sample_response(
        codec.encode_sample_response(
            out, prompt_logprobs_requested=False, topk_prompt_k=0, target_layout=layout
        )
    )
    assert resp.target_prompt_logprobs is not None
    assert list(resp.target_prompt_logprobs.data) == [-0.5, 0.0]
    assert resp.target_prompt_logprobs.sparse_crow_indices == [0, 2, 2]


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"data": [1.0], "dtype": "float32", "shape": [1, 1]}, "must be an int64 tensor"),
        ({"data": [1, 2], "dtype": "int64", "shape": [2]}, "must be 2-D"),
        ({"data": [1, 2], "dtype": "int64"}, "must be 2-D"),
        ({"data": [1, 2], "dtype": "int64", "shape": [3, 1]}, "does not match"),
        (
            {
                "data": [1],
                "dtype": "int64",
                "shape": [2, 2],
                "sparse_crow_indices": [0, 1, 1],
                "sparse_col_indices": [5],
            },
            "col_indices out of range",
        ),
        ("nope", "must be an object"),
    ],
)
def test_target_prompt_ids_errors(d: Any, match: str) -> None:
    with pytest.raises(CodecError, match=match) as info:
        codec.target_prompt_ids(d)
    assert "target_prompt_logprobs" in str(info.value)


def test_encode_prompt_alt_tokens() -> None:
    """Dense [len(prompt) - 1, k] int64 tokens and float32 logprobs; empty ones still arrive
    (the SDK fails if prompt_alt_tokens_k > 0 and the field is missing)."""
    tokens = torch.tensor([[1, 2], [3, 4], [5, 6]])
    lps = torch.tensor([[-0.5, -1.0], [-1.5, -2.0], [-2.5, -3.0]])
    out = SampleOutput(sequences=[], prompt_alt_tokens=tokens, prompt_alt_logprobs=lps)
    resp = response_conv.deserialize_sample_response(
        codec.encode_sample_response(out, prompt_logprobs_requested=False, topk_prompt_k=0)
    )
    alt = resp.prompt_alt_tokens
    assert alt is not None
    assert alt.tokens.dtype == "int64" and alt.tokens.shape == [3, 2]
    assert alt.logprobs.dtype == "float32" and alt.logprobs.shape == [3, 2]
    assert torch.equal(alt.tokens.to_torch(), tokens)
    assert torch.equal(alt.logprobs.to_torch(), lps)
    empty = SampleOutput(
        sequences=[],
        prompt_alt_tokens=torch.zeros((0, 4), dtype=torch.int64),
        prompt_alt_logprobs=torch.zeros((0, 4)),
    )
    resp = response_conv.deserialize_sample_response(
        codec.encode_sample_response(empty, prompt_logprobs_requested=False, topk_prompt_k=0)
    )
    assert resp.prompt_alt_tokens is not None
    assert resp.prompt_alt_tokens.tokens.shape == [0, 4]
    none = response_conv.deserialize_sample_response(
        codec.encode_sample_response(
            SampleOutput(sequences=[]), prompt_logprobs_requested=False, topk_prompt_k=0
        )
    )
    assert none.prompt_alt_tokens is None and none.target_prompt_logprobs is None


# --------------------------------------------------------------------------------------------
# JSON helpers


def test_tensor_from_json_dense_and_csr() -> None:
    dense = T.TensorData.from_torch(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    got = codec.tensor_from_json(sdk_json_td(dense))
    assert got.dtype == torch.float32 and got.tolist() == [[0, 1, 2], [3, 4, 5]]

    target = torch.full((4, 3), -1, dtype=torch.int64)
    target[0, 1] = 7
    target[3, 2] = 8
    sparse = T.TensorData.from_torch_sparse(target, pad_value=-1)
    assert sparse.sparse_crow_indices is not None
    req = T.SampleRequest(
        prompt=T.ModelInput.from_ints([1, 2, 3, 4, 5]),
        sampling_params=T.SamplingParams(max_tokens=1),
        sampling_session_id="s:sample:0",
        target_prompt_logprobs=_tensor_data_to_model(sparse),
    )
    wire = sdk_json(req)["target_prompt_logprobs"]
    got = codec.tensor_from_json(wire, pad_value=-1)
    assert got.dtype == torch.int64 and torch.equal(got, target)
    parsed = schemas.SampleRequest.model_validate(sdk_json(req))
    assert parsed.target_prompt_logprobs is not None
    assert torch.equal(parsed.target_prompt_logprobs.to_torch(pad_value=-1), target)


def sdk_json_td(td: Any) -> dict[str, Any]:
    """TensorData JSON as the SDK writes it inside a request."""
    req = T.SampleRequest(
        prompt=T.ModelInput.from_ints([1]),
        sampling_params=T.SamplingParams(),
        sampling_session_id="x",
        target_prompt_logprobs=_tensor_data_to_model(td),
    )
    return sdk_json(req)["target_prompt_logprobs"]


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"data": [1], "dtype": "int32"}, "dtype"),
        ({"data": [1.5], "dtype": "int64"}, "integer"),
        ({"data": [True], "dtype": "float32"}, "number"),
        ({"data": "abc", "dtype": "float32"}, "must be a list"),
        ({"data": [1.0, 2.0], "dtype": "float32", "shape": [3]}, "does not match"),
        (
            {"data": [1.0], "dtype": "float32", "shape": [2, 2], "sparse_crow_indices": [0, 1, 1]},
            "col_indices",
        ),
        ({"data": [2**70], "dtype": "int64"}, "out of range"),
    ],
)
def test_tensor_from_json_errors(d: dict[str, Any], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        codec.tensor_from_json(d)


def test_model_input_tokens() -> None:
    mi = T.ModelInput(chunks=[T.EncodedTextChunk(tokens=[1, 2]), T.EncodedTextChunk(tokens=[3])])
    assert codec.model_input_tokens(sdk_json(mi)) == [1, 2, 3]
    assert codec.model_input_tokens({"chunks": []}) == []
    img = T.ModelInput(chunks=[T.ImageChunk(data=b"x", format="png")])
    with pytest.raises(CodecError, match="image inputs are not supported"):
        codec.model_input_tokens(sdk_json(img))
    with pytest.raises(CodecError, match="unsupported chunk type"):
        codec.model_input_tokens({"chunks": [{"type": "video"}]})
    with pytest.raises(CodecError, match="integer"):
        codec.model_input_tokens({"chunks": [{"type": "encoded_text", "tokens": ["a"]}]})
    with pytest.raises(CodecError, match="chunks"):
        codec.model_input_tokens({"tokens": [1]})


# --------------------------------------------------------------------------------------------
# JSON request schemas: what the SDK sends parses


def test_sdk_requests_parse() -> None:
    create = T.CreateModelRequest(
        session_id="s",
        model_seq_id=0,
        base_model="Qwen/Qwen3-4B-Instruct-2507",
        lora_config=T.LoraConfig(rank=8, seed=3, train_unembed=False),
    )
    got = schemas.CreateModelRequest.model_validate(sdk_json(create))
    assert got.lora_config.rank == 8 and got.lora_config.seed == 3
    assert got.lora_config.train_unembed is False and got.lora_config.train_mlp is True
    assert got.optimizer_config.type == "adamw"
    minimal = schemas.CreateModelRequest.model_validate(
        {"session_id": "s", "model_seq_id": 1, "base_model": "m", "type": "create_model"}
    )
    assert minimal.lora_config.rank == 32

    optim = T.OptimStepRequest(model_id="m", seq_id=2, adam_params=T.AdamParams(learning_rate=3e-4))
    wire = sdk_json(optim)
    assert "adam_params" in wire
    got_o = schemas.OptimStepRequest.model_validate(wire)
    assert got_o.adam_params is not None and got_o.adam_params.learning_rate == 3e-4
    assert (got_o.adam_params.beta2, got_o.adam_params.eps) == (0.95, 1e-12)
    dimuon = T.OptimStepRequest(
        model_id="m", seq_id=3, optimizer_params=T.DimuonParams(learning_rate=0.02)
    )
    got_d = schemas.OptimStepRequest.model_validate(sdk_json(dimuon))
    assert got_d.optimizer_params is not None and got_d.optimizer_params.type == "dimuon"
    internal = schemas.OptimStepRequest.model_validate(
        {"model_id": "m", "seq_id": 1, "optim_params": {"learning_rate": 0.5}}
    )
    assert internal.adam_params is not None and internal.adam_params.learning_rate == 0.5

    named = T.SaveWeightsForSamplerRequest(model_id="m", path="step1", seq_id=4)
    assert not schemas.SaveWeightsForSamplerRequest.model_validate(sdk_json(named)).is_ephemeral
    eph = T.SaveWeightsForSamplerRequest(
        model_id="m", sampling_session_seq_id=2, kind="inflight", seq_id=5
    )
    got_e = schemas.SaveWeightsForSamplerRequest.model_validate(sdk_json(eph))
    assert got_e.is_ephemeral and got_e.kind == "inflight" and got_e.sampling_session_seq_id == 2

    load_new = T.LoadWeightsRequest(
        session_id="s", model_seq_id=2, path="tinker://r/weights/a", optimizer=True
    )
    got_l = schemas.LoadWeightsRequest.model_validate(sdk_json(load_new))
    assert got_l.is_create and got_l.new_model_id == "s:train:2" and got_l.optimizer
    legacy = T.LoadWeightsRequest(
        model_id="m", seq_id=1, path="tinker://r/weights/a", optimizer=False
    )
    assert not schemas.LoadWeightsRequest.model_validate(sdk_json(legacy)).is_create

    for req, ours in [
        (
            T.SaveWeightsRequest(model_id="m", path="a", seq_id=1, ttl_seconds=3600),
            schemas.SaveWeightsRequest,
        ),
        (
            T.SaveWeightsExternalRequest(model_id="m", path="hf", seq_id=1),
            schemas.SaveWeightsExternalRequest,
        ),
        (
            T.CreateSamplingSessionRequest(
                session_id="s", sampling_session_seq_id=0, model_path="tinker://r/sampler_weights/a"
            ),
            schemas.CreateSamplingSessionRequest,
        ),
        (
            T.CreateSessionRequest(tags=["x"], user_metadata={"a": 1}, sdk_version="0.38.0"),
            schemas.CreateSessionRequest,
        ),
        (T.GetInfoRequest(model_id="m"), schemas.GetInfoRequest),
        (T.SessionHeartbeatRequest(session_id="s"), schemas.SessionHeartbeatRequest),
        (
            T.FutureRetrieveRequest(request_id="r", allow_metadata_only=True),
            schemas.RetrieveFutureRequest,
        ),
    ]:
        wire = sdk_json(req)
        assert "type" in wire or ours is schemas.RetrieveFutureRequest
        parsed = ours.model_validate(wire)
        for key, value in wire.items():
            if key != "type":
                assert getattr(parsed, key) == value, key


def test_sdk_sample_request_parses() -> None:
    req = T.SampleRequest(
        num_samples=2,
        prompt=T.ModelInput.from_ints([1, 2, 3]),
        sampling_params=T.SamplingParams(
            max_tokens=5, stop=["\n"], temperature=0.7, seed=2**63 + 5
        ),
        sampling_session_id="s:sample:0",
        seq_id=3 * 1_000_000_000 + 7 + 2**53,
        prompt_logprobs=True,
        topk_prompt_logprobs=3,
    )
    got = schemas.SampleRequest.model_validate(sdk_json(req))
    assert got.prompt.to_tokens() == [1, 2, 3]
    assert got.seq_id == 3 * 1_000_000_000 + 7 + 2**53
    assert got.prompt_logprobs is True and got.topk_prompt_logprobs == 3
    params = got.sampling_params.to_model(default_max_tokens=16)
    assert (params.max_tokens, params.stop, params.temperature, params.top_k, params.top_p) == (
        5,
        ("\n",),
        0.7,
        -1,
        1.0,
    )
    assert params.seed == 2**63 + 5

    def stop_of(stop: Any) -> Any:
        sp = T.SamplingParams(stop=stop)
        return schemas.SamplingParams.model_validate(sdk_json(sp)).to_model(16).stop

    assert stop_of(None) is None
    assert stop_of([]) == ()
    assert stop_of("END") == ("END",)
    assert stop_of([13, 14]) == (13, 14)
    assert schemas.SamplingParams.model_validate({}).to_model(64).max_tokens == 64


@pytest.mark.parametrize(
    ("model", "data", "loc"),
    [
        (
            schemas.CreateModelRequest,
            {"session_id": "s", "model_seq_id": "0", "base_model": "m"},
            ("model_seq_id",),
        ),
        (
            schemas.CreateModelRequest,
            {"session_id": "s", "model_seq_id": 0, "base_model": "m", "lora_config": {"rank": 0}},
            ("lora_config", "rank"),
        ),
        (
            schemas.CreateModelRequest,
            {
                "session_id": "s",
                "model_seq_id": 0,
                "base_model": "m",
                "lora_config": {"train_unembed": False, "train_mlp": False, "train_attn": False},
            },
            ("lora_config",),
        ),
        (
            schemas.OptimStepRequest,
            {"model_id": "m", "adam_params": {"learning_rate": -1.0}},
            ("adam_params", "learning_rate"),
        ),
        (
            schemas.OptimStepRequest,
            {"model_id": "m", "adam_params": {"beta1": 1.0}},
            ("adam_params", "beta1"),
        ),
        (schemas.OptimStepRequest, {"model_id": "m"}, ()),
        (schemas.SaveWeightsForSamplerRequest, {"model_id": "m"}, ()),
        (schemas.LoadWeightsRequest, {"path": "tinker://a/weights/b", "optimizer": True}, ()),
        (
            schemas.CreateSamplingSessionRequest,
            {"session_id": "s", "sampling_session_seq_id": 0, "model_path": "/tmp/x"},
            (),
        ),
        (
            schemas.SampleRequest,
            {
                "prompt": {"chunks": []},
                "sampling_params": {"temperature": -0.1},
                "sampling_session_id": "s",
            },
            ("sampling_params", "temperature"),
        ),
        (
            schemas.SampleRequest,
            {
                "prompt": {"chunks": []},
                "sampling_params": {"top_p": 0.0},
                "sampling_session_id": "s",
            },
            ("sampling_params", "top_p"),
        ),
        (
            schemas.SampleRequest,
            {
                "prompt": {"chunks": []},
                "sampling_params": {"max_tokens": True},
                "sampling_session_id": "s",
            },
            ("sampling_params", "max_tokens"),
        ),
        (
            schemas.SampleRequest,
            {
                "prompt": {"chunks": []},
                "sampling_params": {"stop": ["a", 1]},
                "sampling_session_id": "s",
            },
            ("sampling_params", "stop"),
        ),
        (
            schemas.SampleRequest,
            {
                "prompt": {"chunks": [{"tokens": ["x"]}]},
                "sampling_params": {},
                "sampling_session_id": "s",
            },
            ("prompt", "chunks", 0, "tokens"),
        ),
        (
            schemas.SampleRequest,
            {
                "prompt": {"chunks": []},
                "sampling_params": {},
                "num_samples": 0,
                "sampling_session_id": "s",
            },
            ("num_samples",),
        ),
        (schemas.SampleRequest, {"prompt": {"chunks": []}, "sampling_params": {}}, ()),
    ],
)
def test_request_validation_errors(
    model: type[BaseModel], data: dict[str, Any], loc: tuple[Any, ...]
) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    locs = [tuple(e["loc"]) for e in info.value.errors()]
    assert any(x[: len(loc)] == loc for x in locs), locs


def test_unknown_fields_and_type_are_ignored() -> None:
    got = schemas.GetInfoRequest.model_validate({"model_id": "m", "type": "get_info", "new": 1})
    assert got.model_id == "m" and not hasattr(got, "new")


def test_image_prompt_parses_but_to_tokens_refuses() -> None:
    req = T.SampleRequest(
        prompt=T.ModelInput(chunks=[T.ImageChunk(data=b"x", format="png")]),
        sampling_params=T.SamplingParams(),
        sampling_session_id="s",
    )
    got = schemas.SampleRequest.model_validate(sdk_json(req))
    with pytest.raises(CodecError, match="image inputs"):
        got.prompt.to_tokens()


# --------------------------------------------------------------------------------------------
# JSON response schemas: what we send parses with the SDK's types

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
CKPT = schemas.Checkpoint(
    checkpoint_id="weights/step1",
    checkpoint_type="training",
    time=NOW,
    tinker_path="tinker://s:train:0/weights/step1",
    size_bytes=123,
)
RESPONSES: list[tuple[BaseModel, Any]] = [
    (schemas.UntypedAPIFuture(request_id="r", model_id="m"), T.UntypedAPIFuture),
    (
        schemas.UntypedAPIFuture(request_id="r", sample_sequence_ids=["r:0", "r:1"]),
        T.UntypedAPIFuture,
    ),
    (
        schemas.GetInfoResponse(
            model_id="s:train:0",
            model_data=schemas.ModelData(model_name="Qwen/Qwen3-8B", tokenizer_id="Qwen/Qwen3-8B"),
            is_lora=True,
            lora_rank=8,
            model_name="Qwen/Qwen3-8B",
        ),
        T.GetInfoResponse,
    ),
    (schemas.CreateModelResponse(model_id="s:train:0"), T.CreateModelResponse),
    (schemas.CreateSessionResponse(session_id="s"), T.CreateSessionResponse),
    (schemas.SessionHeartbeatResponse(), T.SessionHeartbeatResponse),
    (schemas.OptimStepResponse(metrics={"grad_norm:mean": 1.5}), T.OptimStepResponse),
    (schemas.OptimStepResponse(), T.OptimStepResponse),
    (schemas.SaveWeightsResponse(path="tinker://m/weights/a"), T.SaveWeightsResponse),
    (
        schemas.SaveWeightsForSamplerResponse(path="tinker://m/sampler_weights/a"),
        T.SaveWeightsForSamplerResponse,
    ),
    (
        schemas.SaveWeightsForSamplerResponse(sampling_session_id="s:sample:1"),
        T.SaveWeightsForSamplerResponseInternal,
    ),
    (
        schemas.SaveWeightsExternalResponse(path="tinker://m/external_weights/a", size_bytes=9),
        T.SaveWeightsExternalResponseInternal,
    ),
    (schemas.LoadWeightsResponse(path="tinker://m/weights/a", model_id="m"), T.LoadWeightsResponse),
    (
        schemas.CreateSamplingSessionResponse(sampling_session_id="s:sample:0"),
        T.CreateSamplingSessionResponse,
    ),
    (
        schemas.GetSamplerResponse(sampler_id="s:sample:0", base_model="b", model_path=None),
        T.GetSamplerResponse,
    ),
    (
        schemas.GetServerCapabilitiesResponse(
            supported_models=[
                schemas.SupportedModel(
                    model_name="b", max_context_length=2048, trainable=True, sampleable=True
                )
            ]
        ),
        T.GetServerCapabilitiesResponse,
    ),
    (schemas.RequestFailedResponse(error="boom", category="server"), T.RequestFailedResponse),
    (schemas.ClientConfigResponse(use_pyqwest_transport=False), T.ClientConfigResponse),
    (schemas.ClientDynamicConfigResponse(), T.ClientDynamicConfigResponse),
    (CKPT, T.Checkpoint),
    (
        schemas.CheckpointsListResponse(
            checkpoints=[CKPT], cursor=schemas.Cursor(offset=0, limit=10, total_count=1)
        ),
        T.CheckpointsListResponse,
    ),
    (
        schemas.TrainingRun(
            training_run_id="s:train:0",
            base_model="b",
            model_owner="u",
            is_lora=True,
            lora_rank=8,
            last_request_time=NOW,
            last_checkpoint=CKPT,
            user_metadata={"k": "v"},
        ),
        T.TrainingRun,
    ),
    (
        schemas.TrainingRunsResponse(
            training_runs=[], cursor=schemas.Cursor(offset=0, limit=20, total_count=0)
        ),
        T.TrainingRunsResponse,
    ),
    (
        schemas.WeightsInfoResponse(base_model="b", is_lora=True, lora_rank=4, train_mlp=True),
        T.WeightsInfoResponse,
    ),
    (
        schemas.GetSessionResponse(training_run_ids=["s:train:0"], sampler_ids=[]),
        T.GetSessionResponse,
    ),
    (schemas.ListSessionsResponse(sessions=["s"]), T.ListSessionsResponse),
    (
        schemas.ExternalWeightsUrlsResponse(urls={"a.safetensors": "http://x"}, expires=NOW),
        T.ExternalWeightsUrlsResponse,
    ),
    (schemas.TelemetryResponse(), T.TelemetryResponse),
    (schemas.HealthResponse(), T.HealthResponse),
]


@pytest.mark.parametrize(("ours", "sdk_type"), RESPONSES, ids=lambda x: type(x).__name__)
def test_responses_parse_with_sdk_types(ours: BaseModel, sdk_type: Any) -> None:
    wire = ours_json(ours)
    parsed = sdk_type.model_validate(wire)
    for key, value in wire.items():
        got = getattr(parsed, key)
        if isinstance(got, BaseModel):
            got = json.loads(got.model_dump_json(exclude_none=True))
        elif isinstance(got, datetime):
            got = got.isoformat().replace("+00:00", "Z")
            value = value.replace("+00:00", "Z")
        elif isinstance(got, list) and got and isinstance(got[0], BaseModel):
            got = [json.loads(g.model_dump_json(exclude_none=True)) for g in got]
        assert got == value, key


def test_try_again_response_shape() -> None:
    wire = ours_json(schemas.TryAgainResponse(request_id="r"))
    assert wire == {"type": "try_again", "request_id": "r", "queue_state": "active"}
    assert "error" not in ours_json(schemas.UntypedAPIFuture(request_id="r"))


def test_nan_never_in_prompt_logprobs_when_absent() -> None:
    """prompt_logprobs requested but not produced: the field is left out (SDK gives None)."""
    out = SampleOutput(sequences=[SampledSequence(tokens=[1], logprobs=[-1.0], stop_reason="stop")])
    got = response_conv.deserialize_sample_response(
        codec.encode_sample_response(out, prompt_logprobs_requested=True, topk_prompt_k=0)
    )
    assert got.prompt_logprobs is None
    assert not math.isnan(got.sequences[0].logprobs[0])


def test_server_modules_do_not_import_the_sdk() -> None:
    """The server must run without the `tinker` package (it is only the test reference)."""
    import subprocess
    import sys

    code = (
        "import sys; import tinkerd.api.codec, tinkerd.api.schemas, tinkerd.api.proto; "
        "sys.exit(int(any(m == 'tinker' or m.startswith('tinker.') for m in sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
