"""Validation before batching: the model-layer checks, the codec's bounds, the request schemas,
the 422 body, and the body size limit. Cheap versions of what tests/e2e/test_bad_requests.py
checks over HTTP."""

import math
import re
import threading
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from pydantic import ValidationError

from tinkerd.api import codec, proto, schemas
from tinkerd.api.body_limit import BodySizeLimit
from tinkerd.api.codec import CodecError
from tinkerd.api.routes import validation_detail
from tinkerd.engine.ops import CreateAdapter, ForwardBackward, Op
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.model.loading import BaseModel
from tinkerd.model.lora import LoraConfig
from tinkerd.model.losses import LossInputError
from tinkerd.model.sampling import MAX_NUM_SAMPLES, validate_sample_input
from tinkerd.model.training import validate_input
from tinkerd.model.types import Datum, ForwardBackwardInput, SampleInput, SamplingParams
from tinkerd.model.worker import ModelWorker

VOCAB, CONTEXT = 320, 512


def datum(n: int = 4, **inputs: torch.Tensor) -> Datum:
    base = {"target_tokens": torch.arange(1, n + 1), "weights": torch.ones(n)}
    return Datum(list(range(n)), {**base, **inputs})


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (ForwardBackwardInput("a", [datum(weights=torch.ones(4, 0))]), "no columns"),
        (ForwardBackwardInput("a", [datum(weights=torch.ones(3))]), "has length 3"),
        (ForwardBackwardInput("a", [datum(weights=torch.tensor([1, math.nan, 1, 1]))]), "NaN"),
        (ForwardBackwardInput("a", [datum(), Datum([], {})]), "data[1].model_input is empty"),
        (ForwardBackwardInput("a", [Datum([1] * 600, {})]), "context is 512"),
        (ForwardBackwardInput("a", [datum()], "nope"), "unknown loss_fn 'nope'"),
        (ForwardBackwardInput("a", [datum()], "ppo"), "lacks 'logprobs'"),
        (
            ForwardBackwardInput("a", [datum()], "cross_entropy", {"x": math.inf}),
            "loss_fn_config['x']",
        ),
        (ForwardBackwardInput("a", []), "data is empty"),
    ],
)
def test_validate_input_names_the_field(item: ForwardBackwardInput, message: str) -> None:
    with pytest.raises(LossInputError, match=re.escape(message)):
        validate_input(item, VOCAB, CONTEXT)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"params": SamplingParams(max_tokens=0)}, "max_tokens must be >= 1"),
        ({"prompt": [1] * 500, "params": SamplingParams(max_tokens=13)}, "max_tokens (13)"),
        ({"num_samples": MAX_NUM_SAMPLES + 1}, "num_samples must be between"),
        ({"params": SamplingParams(stop=("",))}, "stop[0] is an empty string"),
        ({"params": SamplingParams(stop=(VOCAB,))}, "stop[0] = 320 is not a token id"),
        ({"params": SamplingParams(stop=(-1,))}, "not a token id"),
    ],
)
def test_validate_sample_input_names_the_field(change: dict, message: str) -> None:
    fields = {"adapter_id": None, "prompt": [1, 2, 3], "params": SamplingParams(), **change}
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_sample_input(SampleInput(**fields), VOCAB, CONTEXT)


def test_prompt_plus_max_tokens_may_fill_the_context_exactly() -> None:
    item = SampleInput(None, [1] * 500, SamplingParams(max_tokens=12))
    validate_sample_input(item, VOCAB, CONTEXT)


# -- codec bounds ---------------------------------------------------------------------------


def fwdbwd(tensor: Any) -> bytes:
    msg = proto.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray([1, 2], "<i4").tobytes()
    d.loss_fn_inputs["weights"].CopyFrom(tensor)
    return msg.SerializeToString()


def test_huge_csr_shape_is_refused_before_densifying() -> None:
    t = proto.Tensor(dtype=proto.DTYPE_FLOAT32)
    t.shape.extend([2, 2**40])
    t.sparse_csr.crow_indices = np.asarray([0, 0, 0], "<i8").tobytes()
    with pytest.raises(CodecError, match="more than"):
        codec.decode_forward_backward(fwdbwd(t))


def test_more_than_two_dimensions_are_refused() -> None:
    t = proto.Tensor(dtype=proto.DTYPE_FLOAT32, dense=np.ones(2, "<f4").tobytes())
    t.shape.extend([1] * 70 + [2])
    with pytest.raises(CodecError, match="at most 2"):
        codec.decode_forward_backward(fwdbwd(t))


def test_envelope_parses_even_when_data_is_bad() -> None:
    """model_id and seq_id come out of a body whose tensors are wrong, so the service can
    still account for the seq_id."""
    t = proto.Tensor(dtype=proto.DTYPE_FLOAT32, dense=b"\x00" * 3)
    msg = codec.parse_forward_backward(fwdbwd(t))
    assert (msg.model_id, msg.seq_id) == ("m", 1)
    with pytest.raises(CodecError, match="not a multiple"):
        codec.forward_backward_data(msg)
    with pytest.raises(CodecError, match="malformed"):
        codec.parse_forward_backward(b"\xff\xff\xff")


@pytest.mark.parametrize(
    "tensor",
    [
        {
            "data": [],
            "dtype": "int64",
            "shape": [1, 2**40],
            "sparse_crow_indices": [0, 0],
            "sparse_col_indices": [],
        },
        {
            "data": [1],
            "dtype": "int64",
            "shape": [1, 1],
            "sparse_crow_indices": [0, 2**70],
            "sparse_col_indices": [0],
        },
        {"data": [2**70], "dtype": "int64", "shape": [1, 1]},
    ],
)
def test_target_prompt_tensors_out_of_bounds(tensor: dict[str, Any]) -> None:
    with pytest.raises(CodecError, match="target_prompt_logprobs"):
        codec.target_prompt_ids(tensor)


# -- schemas --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"top_k": 0}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"stop": [-1]}, "stop"),
    ],
)
def test_sampling_params_schema(params: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        schemas.SamplingParams.model_validate(params)


def test_request_schemas() -> None:
    with pytest.raises(ValidationError, match="seq_id"):
        schemas.OptimStepRequest.model_validate({"model_id": "m", "adam_params": {}})
    with pytest.raises(ValidationError, match="NaN"):
        schemas.CreateSessionRequest.model_validate({"user_metadata": {"a": [math.inf]}})
    with pytest.raises(ValidationError, match="rank"):
        schemas.LoraConfig.model_validate({"rank": schemas.MAX_LORA_RANK + 1})
    with pytest.raises(ValidationError, match="num_samples"):
        schemas.SampleRequest.model_validate(
            {
                "prompt": {"chunks": []},
                "sampling_params": {},
                "base_model": "m",
                "num_samples": MAX_NUM_SAMPLES + 1,
            }
        )


def test_validation_detail_does_not_echo_the_input() -> None:
    try:
        schemas.SamplingParams.model_validate({"temperature": math.nan})
    except ValidationError as exc:
        detail = validation_detail(exc.errors())
    assert detail == [
        {
            "loc": ["temperature"],
            "msg": "Input should be a finite number",
            "type": "finite_number",
        }
    ]


# -- body size limit ------------------------------------------------------------------------


def limited_app(limit: int) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    app.add_middleware(BodySizeLimit, max_bytes=limit)
    return app


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_body_size_limit(anyio_backend: str) -> None:
    transport = httpx.ASGITransport(app=limited_app(100))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        ok = await client.post("/echo", content=b"x" * 100)
        assert ok.json() == {"size": 100}
        declared = await client.post("/echo", content=b"x" * 101)
        assert declared.status_code == 413 and "100 bytes" in declared.json()["detail"]

        async def chunks() -> Any:
            for _ in range(3):
                yield b"x" * 60

        streamed = await client.post("/echo", content=chunks())
        assert streamed.status_code == 413 and "100 bytes" in streamed.json()["detail"]


# -- the scheduler's batch-failure path ---------------------------------------------------


def test_a_bad_row_in_a_shared_batch_fails_alone(tiny_base: BaseModel) -> None:
    """If a bad row slips past validation into a batch with another tenant's rows, the batch
    is retried op by op: the good op completes with the same result as alone."""
    worker = ModelWorker(tiny_base)
    scheduler = ModelScheduler(worker)
    for adapter in ("good", "bad"):
        create = CreateAdapter(LoraConfig(rank=4, seed=0))
        ignore = lambda _: None  # noqa: E731
        scheduler.submit(Op(f"c-{adapter}", create, ignore, ignore, model_id=adapter, seq_id=0))
    calls: list[int] = []
    original = worker.forward_backward

    def counting(inputs: list[ForwardBackwardInput]) -> list:
        calls.append(len(inputs))
        return original(inputs)

    worker.forward_backward = counting  # type: ignore[method-assign]
    results: dict[str, object] = {}
    done = threading.Event()

    def op(name: str, item: ForwardBackwardInput) -> Op:
        def finish(result: object) -> None:
            results[name] = result
            if len(results) == 2:
                done.set()

        return Op(name, ForwardBackward(item), finish, finish, model_id=name, seq_id=1)

    good = ForwardBackwardInput("good", [datum()], forward_only=True)
    # No weights: cross_entropy fails inside the pass (validation would have caught it).
    bad = ForwardBackwardInput("bad", [Datum([1, 2], {"target_tokens": torch.tensor([2, 3])})])
    scheduler.submit(op("good", good))
    scheduler.submit(op("bad", bad))
    # Everything is queued before the loop runs: after the two creations (barriers), both
    # runs' heads are forward_backward ops, which share one batch.
    scheduler.start()
    assert done.wait(60)
    scheduler.stop()
    assert calls[0] == 2 and calls[1:] == [1, 1], calls
    assert isinstance(results["bad"], KeyError)
    (alone,) = original([good])
    assert results["good"].metrics == alone.metrics  # type: ignore[attr-defined]
