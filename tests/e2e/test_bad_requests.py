"""Bad input gets a 4xx whose JSON body names the field and the problem, and hurts no one.

One class of bad input per case: malformed bodies, wrong types, missing fields, token ids out
of range, inputs whose length does not match the model input, unknown or unsupported losses,
missing loss inputs, NaN or inf, sequences longer than the context, invalid sampling
parameters, unknown models, ids and paths, and bodies over the size limit. Rejected training
requests still let their run's seq_id move on (checked at the end), and a bad request of one
user never fails another user's request that is in flight with it.
"""

import itertools
import json
import math
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
from e2e_helpers import Server, adam, run_server, sft_datum
from tinker import types

from tinkerd.api import proto
from tinkerd.model.tiny import tiny_config

KEY = "tml-bad-requests"
VOCAB = tiny_config().vocab_size  # 320
CONTEXT = tiny_config().max_position_embeddings  # 512


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{server.base_url}/api/v1", headers={"X-API-Key": KEY}, timeout=60
    ) as client:
        yield client


@dataclass
class Run:
    """A training run and a sampler of the test user; `seq` hands out the run's seq_ids."""

    model_id: str
    session_id: str
    sampler_id: str
    state_path: str
    seq: Iterator[int]


@pytest.fixture(scope="module")
def run(server: Server) -> Run:
    sc = server.client(KEY)
    tc = sc.create_lora_training_client(base_model=server.model, rank=4, seed=0).result()
    state_path = tc.save_state("bad-requests").result().path  # seq 1
    sampler = tc.save_weights_and_get_sampling_client().result()  # seq 2
    return Run(
        model_id=tc.model_id,
        session_id=tc.model_id.split(":train:")[0],
        sampler_id=sampler._sampling_session_id,
        state_path=state_path,
        seq=itertools.count(3),
    )


def session_id(http: httpx.Client) -> str:
    return http.post("/create_session", json={"sdk_version": "0.38.0"}).json()["session_id"]


def post_json(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    """POST a body as the SDK would, except that NaN and Infinity are written as bare words
    (Python's JSON parser, the server's, accepts them)."""
    return http.post(
        path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )


def assert_rejected(response: httpx.Response, *needles: str, status: int | None = None) -> None:
    """A 4xx with a JSON `detail` that mentions every needle (the field and the problem)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail, response.text
    text = json.dumps(detail)
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text}"


# -- JSON endpoints: malformed bodies, wrong types, missing fields ---------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/create_model", {"model_seq_id": 0, "lora_config": {"rank": 8}}, "base_model"),
        ("/create_model", {"base_model": "x", "lora_config": {"rank": 0}}, "rank"),
        ("/create_model", {"base_model": "x", "lora_config": {"rank": 100_000}}, "rank"),
        ("/create_model", {"base_model": "x", "lora_config": {"rank": "eight"}}, "rank"),
        ("/create_model", {"base_model": "x", "user_metadata": {"a": math.nan}}, "user_metadata"),
        ("/optim_step", {"model_id": "m", "seq_id": 1, "adam_params": {"beta1": 2}}, "beta1"),
        ("/optim_step", {"model_id": "m", "adam_params": {}}, "seq_id"),
        (
            "/optim_step",
            {"model_id": "m", "seq_id": 1, "adam_params": {"learning_rate": math.inf}},
            "learning_rate",
        ),
        ("/save_weights", {"model_id": "m", "seq_id": 1}, "path"),
        ("/save_weights", {"model_id": "m", "seq_id": 1, "path": "a", "ttl_seconds": 0}, "ttl"),
        ("/load_weights", {"model_id": "m", "path": "tinker://x/weights/y"}, "seq_id"),
        ("/asample", {"num_samples": 1, "sampling_session_id": "s", "seq_id": 0}, "prompt"),
        ("/retrieve_future", {}, "request_id"),
        ("/retrieve_future", {"request_id": 5}, "request_id"),
        ("/get_info", {"model_id": ""}, "model_id"),
        ("/session_heartbeat", {"session_id": None}, "session_id"),
    ],
)
def test_invalid_json_names_the_field(
    http: httpx.Client, path: str, body: dict, field: str
) -> None:
    body = {"session_id": session_id(http), **body}
    assert_rejected(post_json(http, path, body), field)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b'"a string"', "application/json"),
        (b"", "application/json"),
        (b"session_id=x", "application/x-www-form-urlencoded"),
    ],
)
def test_malformed_json_bodies(http: httpx.Client, content: bytes, content_type: str) -> None:
    response = http.post("/get_info", content=content, headers={"Content-Type": content_type})
    assert_rejected(response)


def test_unparseable_bodies_and_missing_key(http: httpx.Client, server: Server) -> None:
    bad_json = http.post(
        "/create_session", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 422 and bad_json.json()["detail"]
    bad_proto = http.post(
        "/forward_backward",
        content=b"\xff\xff\xff",
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert bad_proto.status_code == 400 and bad_proto.json()["detail"]
    bad_zstd = http.post(
        "/forward_backward",
        content=b"not zstd at all",
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
    )
    assert_rejected(bad_zstd, "zstd", status=400)
    unknown_encoding = http.post(
        "/forward_backward", content=b"", headers={"Content-Encoding": "br"}
    )
    assert_rejected(unknown_encoding, "Content-Encoding", status=400)
    no_key = httpx.post(f"{server.base_url}/api/v1/create_session", json={})
    assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["detail"]
    unknown = http.post("/retrieve_future", json={"request_id": "no-such-request"})
    assert unknown.status_code == 404 and "no-such-request" in unknown.json()["detail"]
    # The server is still serving.
    assert http.get("/healthz").json() == {"status": "ok"}
    assert session_id(http)


# -- forward_backward (protobuf) ------------------------------------------------------------


def tensor(values: Any, dtype: int, shape: list[int] | None = None) -> Any:
    np_dtype = {proto.DTYPE_FLOAT32: "<f4", proto.DTYPE_INT64: "<i8", proto.DTYPE_INT32: "<i4"}
    msg = proto.Tensor(dtype=dtype, dense=np.asarray(values, np_dtype[dtype]).tobytes())
    msg.shape.extend(shape if shape is not None else [len(values)])
    return msg


def fwdbwd_body(
    model_id: str,
    seq_id: int,
    tokens: list[int],
    inputs: dict[str, Any],
    loss_fn: str = "cross_entropy",
    config: dict[str, float] | None = None,
) -> bytes:
    msg = proto.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn)
    for key, value in (config or {}).items():
        msg.loss_fn_config[key] = value
        msg.loss_fn_config_v2[key].number = value
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray(tokens, "<i4").tobytes()
    for key, value in inputs.items():
        datum.loss_fn_inputs[key].CopyFrom(value)
    return msg.SerializeToString()


F32, I64 = proto.DTYPE_FLOAT32, proto.DTYPE_INT64
TOKENS = [1, 2, 3, 4]
TARGETS = tensor([2, 3, 4, 5], I64)
ONES = tensor([1.0] * 4, F32)
RL = {"target_tokens": TARGETS, "logprobs": tensor([-1.0] * 4, F32), "advantages": ONES}


@pytest.mark.parametrize(
    ("case", "tokens", "inputs", "loss_fn", "config", "needles"),
    [
        (
            "negative token",
            [1, -5, 3, 4],
            {"target_tokens": TARGETS, "weights": ONES},
            None,
            None,
            ["data[0].model_input", "outside [0, 320)"],
        ),
        (
            "token == vocab",
            [1, VOCAB, 3, 4],
            {"target_tokens": TARGETS, "weights": ONES},
            None,
            None,
            ["data[0].model_input", "outside"],
        ),
        (
            "target >= vocab",
            TOKENS,
            {"target_tokens": tensor([2, 3, 4, 999], I64), "weights": ONES},
            None,
            None,
            ["target_tokens", "outside"],
        ),
        (
            "short weights",
            TOKENS,
            {"target_tokens": TARGETS, "weights": tensor([1.0] * 3, F32)},
            None,
            None,
            ["'weights'", "length 3", "model_input has 4"],
        ),
        (
            "long targets",
            TOKENS,
            {"target_tokens": tensor([2] * 5, I64), "weights": ONES},
            None,
            None,
            ["'target_tokens'", "length 5"],
        ),
        (
            "shape lies",
            TOKENS,
            {"target_tokens": TARGETS, "weights": tensor([1.0] * 4, F32, [5])},
            None,
            None,
            ["weights", "shape [5]"],
        ),
        (
            "3-D input",
            TOKENS,
            {"target_tokens": TARGETS, "weights": tensor([1.0] * 8, F32, [4, 1, 2])},
            None,
            None,
            ["weights", "dimensions"],
        ),
        (
            "unknown loss",
            TOKENS,
            {"target_tokens": TARGETS, "weights": ONES},
            "nope",
            None,
            ["unknown loss_fn 'nope'", "cross_entropy"],
        ),
        (
            "empty loss",
            TOKENS,
            {"target_tokens": TARGETS, "weights": ONES},
            "",
            None,
            ["unknown loss_fn"],
        ),
        ("no provenance", TOKENS, RL, "stable_reinforce", None, ["data[0]", "provenance"]),
        (
            "missing weights",
            TOKENS,
            {"target_tokens": TARGETS},
            None,
            None,
            ["lacks 'weights'", "cross_entropy"],
        ),
        (
            "missing advantages",
            TOKENS,
            {"target_tokens": TARGETS, "logprobs": ONES},
            "importance_sampling",
            None,
            ["lacks 'advantages'"],
        ),
        ("missing mask", TOKENS, RL, "gspo", None, ["lacks 'sequence_ratio_mask'"]),
        (
            "NaN weight",
            TOKENS,
            {"target_tokens": TARGETS, "weights": tensor([1.0, math.nan, 1.0, 1.0], F32)},
            None,
            None,
            ["'weights'", "NaN"],
        ),
        (
            "inf advantage",
            TOKENS,
            {**RL, "advantages": tensor([1.0, -math.inf, 0, 0], F32)},
            "importance_sampling",
            None,
            ["'advantages'", "inf"],
        ),
        (
            "NaN logprob",
            TOKENS,
            {**RL, "logprobs": tensor([math.nan] * 4, F32)},
            "ppo",
            None,
            ["'logprobs'", "NaN"],
        ),
        (
            "NaN config",
            TOKENS,
            RL,
            "ppo",
            {"clip_low_threshold": math.nan},
            ["loss_fn_config['clip_low_threshold']", "finite"],
        ),
        ("inf beta", TOKENS, RL, "dro", {"beta": math.inf}, ["loss_fn_config['beta']"]),
        ("missing beta", TOKENS, RL, "dro", {}, ["beta"]),
        (
            "bad clip order",
            TOKENS,
            RL,
            "ppo",
            {"clip_low_threshold": 1.5, "clip_high_threshold": 1.0},
            ["clip_low_threshold"],
        ),
        (
            "float targets",
            TOKENS,
            {"target_tokens": tensor([2.5, 3, 4, 5], F32), "weights": ONES},
            None,
            None,
            ["target_tokens", "integers"],
        ),
        (
            "too long",
            [1] * (CONTEXT + 1),
            {
                "target_tokens": tensor([1] * (CONTEXT + 1), I64),
                "weights": tensor([1.0] * (CONTEXT + 1), F32),
            },
            None,
            None,
            ["513 tokens", "context is 512"],
        ),
        (
            "empty input",
            [],
            {"target_tokens": tensor([], I64), "weights": tensor([], F32)},
            None,
            None,
            ["model_input is empty"],
        ),
    ],
)
def test_forward_backward_rejections(
    http: httpx.Client,
    run: Run,
    case: str,
    tokens: list[int],
    inputs: dict[str, Any],
    loss_fn: str | None,
    config: dict[str, float] | None,
    needles: list[str],
) -> None:
    body = fwdbwd_body(
        run.model_id,
        next(run.seq),
        tokens,
        inputs,
        "cross_entropy" if loss_fn is None else loss_fn,
        config,
    )
    response = http.post(
        "/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"}
    )
    assert_rejected(response, *needles, status=400)


def test_forward_backward_unknown_model_and_bad_seq(http: httpx.Client, run: Run) -> None:
    inputs = {"target_tokens": TARGETS, "weights": ONES}
    headers = {"Content-Type": "application/x-protobuf"}
    unknown = http.post(
        "/forward_backward",
        content=fwdbwd_body("no-such:train:0", 1, TOKENS, inputs),
        headers=headers,
    )
    assert_rejected(unknown, "no-such:train:0", status=404)
    bad_seq = http.post(
        "/forward_backward", content=fwdbwd_body(run.model_id, 0, TOKENS, inputs), headers=headers
    )
    assert_rejected(bad_seq, "seq_id", status=400)


# -- JSON training requests of a real run: 422s still move the run's seq_id on --------------


@pytest.mark.parametrize(
    ("path", "extra", "field"),
    [
        ("/optim_step", {"adam_params": {"beta2": 1.5}}, "beta2"),
        ("/optim_step", {"adam_params": {"eps": "small"}}, "eps"),
        ("/save_weights", {"path": "x", "ttl_seconds": -5}, "ttl_seconds"),
        ("/save_weights", {"path": "../escape"}, "checkpoint name"),
        ("/save_weights_for_sampler", {"kind": "weird"}, "kind"),
        ("/save_weights_external", {"path": "x", "age_encryption_recipients": "k"}, "age"),
        ("/load_weights", {"path": "not-a-tinker-path"}, "tinker://"),
        ("/load_weights", {"path": "tinker://nope:train:0/weights/x"}, "not found"),
    ],
)
def test_training_json_rejections(
    http: httpx.Client, run: Run, path: str, extra: dict, field: str
) -> None:
    body = {"model_id": run.model_id, "seq_id": next(run.seq), **extra}
    assert_rejected(post_json(http, path, body), field)


# -- sampling ---------------------------------------------------------------------------------


def sample_body(run: Run, **overrides: Any) -> dict[str, Any]:
    params = overrides.pop("sampling_params", {})
    body = {
        "sampling_session_id": run.sampler_id,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {
            "max_tokens": 2,
            "temperature": 1.0,
            "top_k": -1,
            "top_p": 1.0,
            **params,
        },
        "num_samples": 1,
        "seq_id": 0,
        "type": "sample",
    }
    return {**body, **overrides}


def prompt(tokens: list[int]) -> dict[str, Any]:
    return {"chunks": [{"type": "encoded_text", "tokens": tokens}]}


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"sampling_params": {"max_tokens": 0}}, ["max_tokens"]),
        ({"sampling_params": {"max_tokens": -3}}, ["max_tokens"]),
        ({"sampling_params": {"max_tokens": 1.5}}, ["max_tokens"]),
        ({"sampling_params": {"temperature": -0.1}}, ["temperature"]),
        ({"sampling_params": {"temperature": math.nan}}, ["temperature"]),
        ({"sampling_params": {"temperature": math.inf}}, ["temperature"]),
        ({"sampling_params": {"temperature": "hot"}}, ["temperature"]),
        ({"sampling_params": {"top_p": 0.0}}, ["top_p"]),
        ({"sampling_params": {"top_p": 1.01}}, ["top_p"]),
        ({"sampling_params": {"top_p": math.nan}}, ["top_p"]),
        ({"sampling_params": {"top_k": 0}}, ["top_k"]),
        ({"sampling_params": {"top_k": -2}}, ["top_k"]),
        ({"sampling_params": {"stop": ""}}, ["stop"]),
        ({"sampling_params": {"stop": ["a", 1]}}, ["stop"]),
        ({"sampling_params": {"stop": [-1]}}, ["stop"]),
        ({"sampling_params": {"stop": [VOCAB]}}, ["stop[0]", "token id"]),
        ({"sampling_params": {"seed": 2**70}}, ["seed"]),
        ({"num_samples": 0}, ["num_samples"]),
        ({"num_samples": 10**6}, ["num_samples"]),
        ({"topk_prompt_logprobs": -1}, ["topk_prompt_logprobs"]),
        ({"topk_sample_logprobs": -1}, ["topk_sample_logprobs"]),
        ({"topk_prompt_logprobs": 10**9}, ["topk_prompt_logprobs", "cells"]),
        ({"prompt_alt_tokens_k": -1}, ["prompt_alt_tokens_k"]),
        ({"prompt_logprobs_last_n": 2}, ["prompt_logprobs_last_n"]),
        ({"prompt": prompt([])}, ["prompt is empty"]),
        ({"prompt": prompt([1, -1])}, ["prompt", "outside [0, 320)"]),
        ({"prompt": prompt([1, VOCAB])}, ["prompt", "outside"]),
        ({"prompt": prompt(["a"])}, ["tokens"]),
        ({"prompt": {"chunks": [{"type": "image", "data": "", "format": "png"}]}}, ["image"]),
        ({"prompt": prompt([1] * CONTEXT)}, ["context is 512"]),
        (
            {"prompt": prompt([1] * 500), "sampling_params": {"max_tokens": 13}},
            ["max_tokens (13)", "context of 512"],
        ),
        (
            {"target_prompt_logprobs": {"data": [1.5], "dtype": "float32", "shape": [1, 1]}},
            ["target_prompt_logprobs"],
        ),
        (
            {"target_prompt_logprobs": {"data": [math.nan], "dtype": "float32", "shape": [2, 1]}},
            ["target_prompt_logprobs"],
        ),
        (
            {"target_prompt_logprobs": {"data": [1, 2, 3], "dtype": "int64", "shape": [3, 1]}},
            ["target_prompt_logprobs", "shape"],
        ),
        (
            {"target_prompt_logprobs": {"data": [999, 1], "dtype": "int64", "shape": [2, 1]}},
            ["target_prompt_logprobs", "outside"],
        ),
        (
            {
                "target_prompt_logprobs": {
                    "data": [],
                    "dtype": "int64",
                    "shape": [2, 2**40],
                    "sparse_crow_indices": [0, 0, 0],
                    "sparse_col_indices": [],
                }
            },
            ["target_prompt_logprobs", "cells"],
        ),
        ({"sampling_session_id": "no-such-sampler"}, ["no-such-sampler"]),
        ({"sampling_session_id": None, "base_model": "no-such/model"}, ["no-such/model"]),
        (
            {"sampling_session_id": None, "model_path": "tinker://x:train:0/sampler_weights/y"},
            ["tinker://x:train:0/sampler_weights/y"],
        ),
    ],
)
def test_sample_rejections(
    http: httpx.Client, run: Run, overrides: dict[str, Any], needles: list[str]
) -> None:
    body = {k: v for k, v in sample_body(run, **overrides).items() if v is not None}
    assert_rejected(post_json(http, "/asample", body), *needles)


def test_unknown_models_ids_and_paths(http: httpx.Client, run: Run) -> None:
    sid = session_id(http)
    assert_rejected(
        http.post(
            "/create_model",
            json={"session_id": sid, "model_seq_id": 0, "base_model": "no-such/model"},
        ),
        "no-such/model",
        status=404,
    )
    assert_rejected(
        http.post("/get_info", json={"model_id": "nope:train:0"}), "nope:train:0", status=404
    )
    assert_rejected(
        http.post(
            "/create_sampling_session",
            json={
                "session_id": sid,
                "sampling_session_seq_id": 0,
                "model_path": "tinker://nope/weights/x",
            },
        ),
        "tinker://nope/weights/x",
    )
    assert_rejected(http.post("/weights_info", json={"tinker_path": "nonsense"}), "tinker")
    assert_rejected(http.get("/training_runs/nope:train:0"), "nope:train:0", status=404)
    assert_rejected(http.get("/samplers/nope"), "nope", status=404)
    assert_rejected(http.get("/training_runs?limit=-1"), "limit", status=422)
    # Another user cannot see this user's run (404, not 403: nothing leaks).
    other = httpx.post(
        str(http.base_url) + "/get_info",
        json={"model_id": run.model_id},
        headers={"X-API-Key": "tml-someone-else"},
    )
    assert other.status_code == 404


def test_rejected_training_requests_let_the_run_move_on(http: httpx.Client, run: Run) -> None:
    """Every rejection above took a seq_id of the run; the next request still runs."""
    body = fwdbwd_body(
        run.model_id, next(run.seq), TOKENS, {"target_tokens": TARGETS, "weights": ONES}
    )
    response = http.post(
        "/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"}
    )
    assert response.status_code == 200, response.text
    result = http.post(
        "/retrieve_future", json={"request_id": response.json()["request_id"]}, timeout=120
    )
    assert result.headers["content-type"].startswith("application/x-protobuf"), result.text
    out = proto.ForwardBackwardOutput.FromString(result.content)
    assert math.isfinite(out.metrics["loss:sum"])


def test_sdk_rejected_optim_step_lets_the_run_move_on(clients, server: Server) -> None:
    """The SDK does not check AdamParams; the server's 422 must not stall the run."""
    tc = clients(KEY).create_lora_training_client(base_model=server.model, rank=4).result()
    with pytest.raises(tinker.UnprocessableEntityError, match="beta1"):
        tc.optim_step(types.AdamParams(beta1=2.0)).result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match="weights"):
        tc.forward_backward([sft_datum([1, 2, 3], [math.nan, 1.0])], "cross_entropy").result()
    out = tc.forward_backward([sft_datum([1, 2, 3, 4])], "cross_entropy").result(timeout=60)
    assert math.isfinite(out.metrics["loss:sum"])
    tc.optim_step(adam(1e-3)).result(timeout=60)


def test_dimuon_is_refused_not_silently_replaced(clients, server: Server) -> None:
    """Dimuon's update rule is not public: asking for it is a clear 400, never AdamW instead."""
    sc = clients(KEY)
    with pytest.raises(tinker.BadRequestError, match="dimuon"):
        sc.create_lora_training_client(
            base_model=server.model, rank=4, optimizer=types.DimuonOptimizerConfig()
        ).result(timeout=60)
    tc = sc.create_lora_training_client(base_model=server.model, rank=4).result()
    tc.forward_backward([sft_datum([1, 2, 3, 4])], "cross_entropy").result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match="dimuon"):
        tc.optim_step(types.DimuonParams(learning_rate=0.02)).result(timeout=60)
    tc.optim_step(adam(1e-3)).result(timeout=60)  # the run goes on


def test_a_bad_request_never_fails_another_users_request(clients, server: Server) -> None:
    """Two users' forward_backward requests in flight together, one bad: the bad one is
    refused at submission (before batching); the good one's result is unaffected."""
    good_tc = (
        clients("tml-tenant-good")
        .create_lora_training_client(base_model=server.model, rank=4, seed=5)
        .result()
    )
    bad_tc = (
        clients("tml-tenant-bad")
        .create_lora_training_client(base_model=server.model, rank=4, seed=5)
        .result()
    )
    datum = sft_datum([7, 8, 9, 10, 11])
    reference = good_tc.forward([datum], "cross_entropy").result(timeout=60)
    pending = [good_tc.forward([datum], "cross_entropy") for _ in range(3)]
    bad_data = [sft_datum([7, 8, 9, 10, 11], [1.0, math.inf, 1.0, 1.0])]
    with pytest.raises(tinker.BadRequestError, match="NaN or inf"):
        bad_tc.forward_backward(bad_data, "cross_entropy").result(timeout=60)
    for future in pending:
        out = future.result(timeout=60)
        assert out.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
    # The bad tenant's run keeps going too.
    fine = bad_tc.forward([datum], "cross_entropy").result(timeout=60)
    assert fine.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)


# -- body size limit --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with run_server(
        tiny_model_dir, tmp_path_factory.mktemp("small"), TINKERD_MAX_BODY_BYTES="4096"
    ) as srv:
        yield srv


def test_bodies_over_the_size_limit_get_413(small_server: Server) -> None:
    url = f"{small_server.base_url}/api/v1"
    headers = {"X-API-Key": KEY}
    small = httpx.post(f"{url}/create_session", json={"tags": ["x"] * 10}, headers=headers)
    assert small.status_code == 200, small.text
    # Declared too large: refused from the Content-Length alone.
    big = {"tags": ["x" * 100] * 100}
    declared = httpx.post(f"{url}/create_session", json=big, headers=headers)
    assert_rejected(declared, "4096", "TINKERD_MAX_BODY_BYTES", status=413)
    # Streamed without a length (chunked): counted as it arrives.
    chunks = [b'{"tags": [' + b'"xxxxxxxxxx", ' * 400 + b'"x"]}']

    def stream() -> Iterator[bytes]:
        yield from chunks

    streamed = httpx.post(
        f"{url}/create_session",
        content=stream(),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert_rejected(streamed, "4096", status=413)
    proto_stream = httpx.post(
        f"{url}/forward_backward",
        content=iter([b"\x00" * 3000, b"\x00" * 3000]),
        headers={**headers, "Content-Type": "application/x-protobuf"},
    )
    assert_rejected(proto_stream, "4096", status=413)
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_client_gone_mid_body_is_not_a_400(server: Server) -> None:
    """A client that disconnects before its whole body arrived (the SDK's futures poller,
    cancelled at shutdown, does) is answered 499, client closed request: FastAPI's
    "error parsing the body" 400 would count as a caller error nobody made."""
    url = httpx.URL(server.base_url)
    before = server.count_in_log('"POST /api/v1/retrieve_futures HTTP/1.1" 499')
    head = (
        "POST /api/v1/retrieve_futures HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nX-API-Key: tml-e2e\r\nContent-Length: 200\r\n\r\n"
    )
    with socket.create_connection((url.host, url.port), timeout=10) as conn:
        conn.sendall(head.encode() + b'{"target": {')
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.count_in_log('"POST /api/v1/retrieve_futures HTTP/1.1" 499') > before:
            break
        time.sleep(0.05)
    else:
        pytest.fail("no 499 logged for the abandoned request:\n" + server.log()[-2000:])
    assert httpx.get(f"{server.base_url}/api/v1/healthz", timeout=10).status_code == 200
