"""Fuzzing: no input, however wrong, gets a 5xx or hurts anyone; afterwards the SDK still works.

(a) schemathesis generates requests for every JSON operation of the server's own OpenAPI
    schema (valid ones and, in negative mode, schema-violating ones), sometimes pointing them
    at real sessions, runs and checkpoints so that validation deeper than the schema is
    reached. Every response must be below 500, and every 4xx must carry a JSON `detail`.
(b) hypothesis builds forward_backward protobuf bodies (random bytes, and well-formed messages
    with wrong lengths, NaN tensors, huge ids, wrong dtypes and shapes) and /asample JSON bodies
    with random prompts, tensors and parameters, against real runs and samplers.
Then a normal SDK client trains (the loss falls) and samples on the same server.

Time is bounded by hypothesis `max_examples` per operation (about a minute in all on two
cores); FUZZ_EXAMPLES=<n> scales it up for a longer local run.
"""

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from e2e_helpers import Server, adam, run_server, sft_datum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from tinker import types

from tinkerd.api import proto
from tinkerd.model.tiny import tiny_config

KEY = "tml-fuzz"
VOCAB = tiny_config().vocab_size
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
STRICT_CHECKS = [negative_data_rejection, response_schema_conformance, status_code_conformance]
# Ids of real objects that generated requests are sometimes pointed at.
ID_KEYS = ("session_id", "model_id", "sampling_session_id", "run_id", "sampler_id")
PATH_KEYS = ("path", "model_path", "source_path", "tinker_path")


@dataclass
class Targets:
    """Real ids of the fuzz user: a session, a training run, a sampler and checkpoints."""

    session_id: str
    model_id: str
    sampler_id: str
    state_path: str
    sampler_path: str


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own: the fuzzer leaves runs, checkpoints and queued ops behind."""
    with run_server(tiny_model_dir, tmp_path_factory.mktemp("fuzz")) as srv:
        yield srv


@pytest.fixture(scope="module")
def targets(fuzz_server: Server) -> Targets:
    sc = fuzz_server.client(KEY)
    tc = sc.create_lora_training_client(base_model=fuzz_server.model, rank=4, seed=0).result()
    tc.forward_backward([sft_datum([1, 2, 3, 4])], "cross_entropy").result()
    state = tc.save_state("fuzz-state").result().path
    sampler_path = tc.save_weights_for_sampler("fuzz-sampler").result().path
    sampler = tc.save_weights_and_get_sampling_client().result()
    return Targets(
        session_id=tc.model_id.split(":train:")[0],
        model_id=tc.model_id,
        sampler_id=sampler._sampling_session_id,
        state_path=state,
        sampler_path=sampler_path,
    )


@pytest.fixture(scope="module")
def http(fuzz_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.base_url, timeout=60) as client:
        yield client


def assert_clean(response: httpx.Response | Any, what: str) -> None:
    """Below 500, and a 4xx says what is wrong in JSON (a bare 400 the SDK would retry)."""
    status = response.status_code
    assert status < 500, f"{what}: {status} {response.text[:2000]}"
    if 400 <= status < 500:
        body = response.json()
        assert isinstance(body, dict) and body.get("detail"), f"{what}: {status} {body}"


# -- (a) schemathesis over the OpenAPI schema ---------------------------------------------------


def _json_operations() -> list[tuple[str, GenerationMode]]:
    """(`METHOD path`, mode) for every operation of the app's schema (no server needed).
    Negative mode only where something can be made invalid: a body or a query parameter
    (string path parameters and headers have no invalid values)."""
    from tinkerd.api.app import create_app
    from tinkerd.config import Settings

    spec = create_app(Settings()).openapi()
    skip = {("POST", "/api/v1/forward_backward")}  # protobuf: fuzzed in (b)
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if (method.upper(), path) in skip:
                continue
            name = f"{method.upper()} {path}"
            out.append((name, GenerationMode.POSITIVE))
            query = any(p["in"] == "query" for p in op.get("parameters", []))
            if "requestBody" in op or query:
                out.append((name, GenerationMode.NEGATIVE))
    return out


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


def _point_at_real_objects(case: Any, targets: Targets, data: st.DataObject) -> None:
    """With some probability, replace generated ids and paths by the fuzz user's real ones."""
    real = {
        "session_id": targets.session_id,
        "model_id": targets.model_id,
        "run_id": targets.model_id,
        "sampling_session_id": targets.sampler_id,
        "sampler_id": targets.sampler_id,
    }
    paths = [targets.state_path, targets.sampler_path]
    for container in (case.body, case.path_parameters):
        if not isinstance(container, dict):
            continue
        for key in list(container):
            if key in ID_KEYS and data.draw(st.booleans(), label=f"real {key}"):
                container[key] = real[key]
            elif key in PATH_KEYS and data.draw(st.booleans(), label=f"real {key}"):
                container[key] = data.draw(st.sampled_from(paths), label=key)
    if isinstance(case.body, dict) and case.body.get("sampling_session_id") == targets.sampler_id:
        # Real sampling work: keep it small so the fuzzer does not queue minutes of decoding.
        case.body["num_samples"] = 1
        params = case.body.get("sampling_params")
        if isinstance(params, dict):
            params["max_tokens"] = 2


@pytest.mark.parametrize(("operation", "mode"), _json_operations())
def test_schemathesis_no_server_errors(
    operation: str, mode: GenerationMode, api_schema: Any, targets: Targets, fuzz_server: Server
) -> None:
    method, path = operation.split(" ", 1)
    op = api_schema[path][method]

    @FUZZ_SETTINGS
    @given(case=op.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        if mode is GenerationMode.POSITIVE:  # negative cases must stay invalid
            _point_at_real_objects(case, targets, data)
        headers = {"X-API-Key": KEY}
        response = case.call(base_url=fuzz_server.base_url, headers=headers, timeout=60)
        assert_clean(response, f"{method} {case.formatted_path} {case.body!r:.500}")
        # Beyond "no 5xx": schema-violating input is refused, and every status and response
        # is one the schema documents.
        case.validate_response(response, checks=STRICT_CHECKS, headers=headers)

    try:
        run()
    except Unsatisfiable:
        pytest.skip("nothing in this operation's schema can be made invalid")


# -- (b) hypothesis: forward_backward protobuf and /asample JSON ------------------------------


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid three times in four: every field wrong at once would only test the first check."""
    return st.one_of(good, good, good, bad)


FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38]),
)
TOKEN = st.one_of(
    st.integers(0, VOCAB - 1),
    st.sampled_from([-1, VOCAB, 2**31 - 1, -(2**31)]),
)
LOSSES = st.sampled_from(
    [
        *("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"),
        *("", "nope", "custom", "stable_reinforce"),
    ]
)
INPUT_KEYS = st.sampled_from(
    ["target_tokens", "weights", "advantages", "logprobs", "sequence_ratio_mask", "mask"]
)


@st.composite
def tensor_messages(draw: st.DrawFn, n: int) -> Any:
    """A proto Tensor near the right shape for a datum of n tokens: dense or CSR, any dtype."""
    msg = proto.Tensor()
    dtype = draw(st.sampled_from([1, 1, 2, 2, 3, 4, 0, 7]))
    msg.dtype = dtype
    length = draw(st.sampled_from([n, n, n, n - 1, n + 1, 0]))
    k = draw(st.sampled_from([None, None, 1, 2, 0]))
    cells = max(length, 0) * (k or 1)
    if draw(st.integers(0, 9)) == 0:  # CSR, possibly with a huge or inconsistent shape
        rows = draw(st.sampled_from([max(length, 0), 2**40, 1]))
        cols = draw(st.sampled_from([1, 2, 2**40]))
        msg.shape.extend([rows, cols])
        nnz = draw(st.integers(0, 3))
        msg.sparse_csr.values = np.zeros(nnz, np.float32).tobytes()
        msg.sparse_csr.crow_indices = np.asarray(
            draw(st.lists(st.integers(-2, 4), max_size=5)), "<i8"
        ).tobytes()
        msg.sparse_csr.col_indices = np.asarray(
            draw(st.lists(st.integers(-2, 2**41), max_size=nnz + 1)), "<i8"
        ).tobytes()
        return msg
    if k is not None:
        msg.shape.extend([max(length, 0), k])
    elif draw(st.booleans()):
        msg.shape.extend(draw(st.lists(st.integers(-1, n + 1), max_size=3)))
    if dtype in (2, 3):
        values = draw(st.lists(TOKEN, min_size=cells, max_size=cells))
        msg.dense = np.asarray(values, "<i8" if dtype == 2 else "<i4").tobytes()
    elif dtype == 1:
        floats = draw(st.lists(FLOATS, min_size=cells, max_size=cells))
        msg.dense = np.asarray(floats, "<f4").tobytes()
    else:
        msg.dense = draw(st.binary(max_size=4 * cells + 3))
    return msg


@st.composite
def fwdbwd_bodies(draw: st.DrawFn, model_id: str) -> tuple[bytes, str | None]:
    """A forward_backward body: raw garbage, or a message that is wrong in some detail."""
    if draw(st.integers(0, 4)) == 0:
        raw = draw(st.binary(max_size=300))
        return raw, draw(st.sampled_from([None, "zstd", "gzip", "deflate", "br", "identity"]))
    msg = proto.ForwardBackwardRequest()
    msg.model_id = draw(mostly(st.just(model_id), st.sampled_from(["nope", ""])))
    # Far-future seq_ids: whatever is accepted waits in the queue and never runs.
    msg.seq_id = draw(st.sampled_from([10_000 + draw(st.integers(0, 10**6)), 0, -1, 2**31 - 1]))
    msg.loss_fn = draw(LOSSES)
    msg.forward_only = draw(st.booleans())
    for key, value in draw(
        st.dictionaries(st.sampled_from(["beta", "clip_low_threshold"]), FLOATS)
    ).items():
        msg.loss_fn_config[key] = value
        msg.loss_fn_config_v2[key].number = value
    for _ in range(draw(st.integers(0, 3))):
        datum = msg.data.add()
        tokens = draw(st.lists(TOKEN, max_size=12))
        if draw(st.integers(0, 20)) == 0:
            tokens = [1] * 600  # longer than the tiny model's context (512)
        datum.model_input.add().encoded_text.tokens = np.asarray(tokens, "<i4").tobytes()
        if draw(st.integers(0, 15)) == 0:
            datum.model_input.add()  # an empty chunk
        for key in draw(st.lists(INPUT_KEYS, max_size=4, unique=True)):
            datum.loss_fn_inputs[key].CopyFrom(draw(tensor_messages(len(tokens))))
    return msg.SerializeToString(), None


def test_fuzz_forward_backward_protobuf(
    http: httpx.Client, targets: Targets, fuzz_server: Server
) -> None:
    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES * 25)
    @given(body=fwdbwd_bodies(targets.model_id))
    def run(body: tuple[bytes, str | None]) -> None:
        content, encoding = body
        headers = {"X-API-Key": KEY, "Content-Type": "application/x-protobuf"}
        if encoding:
            headers["Content-Encoding"] = encoding
        response = http.post("/api/v1/forward_backward", content=content, headers=headers)
        assert_clean(response, f"forward_backward {content[:200]!r}")

    run()


TENSOR_JSON = st.fixed_dictionaries(
    {
        "data": st.one_of(st.lists(TOKEN, max_size=8), st.lists(FLOATS, max_size=8)),
        "dtype": mostly(st.just("int64"), st.sampled_from(["float32", "bfloat16"])),
        "shape": st.lists(st.sampled_from([1, 2, 3, 0, -1, 2**40]), max_size=3),
    },
    optional={
        "sparse_crow_indices": st.lists(st.integers(-1, 4), max_size=4),
        "sparse_col_indices": st.lists(st.sampled_from([-1, 0, 1, 2**70]), max_size=4),
    },
)
SAMPLING_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": mostly(st.integers(1, 3), st.sampled_from([0, -1, 600, 10**12, 1.5, "2"])),
        "temperature": mostly(
            st.sampled_from([0.0, 0.7, 1.0, 2.0]), st.one_of(FLOATS, st.just("hot"))
        ),
        "top_p": mostly(st.sampled_from([0.5, 1.0]), st.one_of(FLOATS, st.sampled_from([0, 2]))),
        "top_k": mostly(st.sampled_from([-1, 1, 5]), st.sampled_from([0, -2, 10**20, True])),
        "seed": mostly(st.sampled_from([0, -1, 2**64 - 1]), st.sampled_from([2**64, 2**70])),
        "stop": mostly(
            st.one_of(
                st.lists(st.text(min_size=1, max_size=3), max_size=3),
                st.lists(st.integers(0, VOCAB - 1), max_size=3),
            ),
            st.one_of(st.lists(TOKEN, max_size=3), st.text(max_size=3), st.just(["a", 1])),
        ),
    },
)
CHUNK = st.fixed_dictionaries(
    {"tokens": st.lists(mostly(st.integers(0, VOCAB - 1), TOKEN), min_size=1, max_size=8)},
    optional={"type": mostly(st.just("encoded_text"), st.sampled_from(["image", "x"]))},
)
SAMPLE_BODIES_BASE = st.fixed_dictionaries(
    {
        "prompt": mostly(
            st.fixed_dictionaries({"chunks": st.lists(CHUNK, min_size=1, max_size=2)}),
            st.sampled_from(
                [
                    {"chunks": [{"type": "encoded_text", "tokens": [1] * 520}]},
                    {"chunks": []},
                    {"chunks": "nope"},
                ]
            ),
        ),
        "sampling_params": SAMPLING_PARAMS,
    },
    optional={
        "num_samples": mostly(st.sampled_from([1, 2]), st.sampled_from([0, -1, 10**6])),
        "prompt_logprobs": st.sampled_from([True, False, 1]),
        "topk_prompt_logprobs": mostly(st.sampled_from([0, 3]), st.sampled_from([-1, 10**9])),
        "topk_sample_logprobs": mostly(st.sampled_from([0, 2]), st.sampled_from([-1, 10**9])),
        "prompt_alt_tokens_k": mostly(st.sampled_from([0, 1]), st.sampled_from([-1, 10**9])),
        "prompt_logprobs_last_n": st.sampled_from([1, 2, 0, -1, 10**9]),
        "seq_id": mostly(st.integers(0, 10**6), st.sampled_from([-1, 2**63, 2**70])),
    },
)


SAMPLE_BODIES = st.one_of(
    SAMPLE_BODIES_BASE,
    SAMPLE_BODIES_BASE,
    st.builds(lambda b, t: {**b, "target_prompt_logprobs": t}, SAMPLE_BODIES_BASE, TENSOR_JSON),
)


def test_fuzz_asample_json(http: httpx.Client, targets: Targets) -> None:
    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES * 20)
    @given(body=SAMPLE_BODIES, sampler=st.sampled_from([targets.sampler_id] * 3 + ["nope"]))
    def run(body: dict[str, Any], sampler: str) -> None:
        body = {**body, "sampling_session_id": sampler, "type": "sample"}
        headers = {"X-API-Key": KEY}
        # json.dumps writes NaN and Infinity as bare words, which Python's parser accepts.
        content = json.dumps(body).encode()
        response = http.post(
            "/api/v1/asample",
            content=content,
            headers={**headers, "Content-Type": "application/json"},
        )
        assert_clean(response, f"asample {body!r:.1000}")
        if response.status_code != 200:
            return
        # Accepted: the work itself must not fail, or fail only as the caller's error.
        request_id = response.json()["request_id"]
        result = http.post(
            "/api/v1/retrieve_future", json={"request_id": request_id}, headers=headers
        )
        assert result.status_code == 200, result.text
        if "json" in result.headers.get("content-type", ""):
            out = result.json()
            assert out.get("category") == "user", f"asample {body!r:.1000}: {out}"

    run()


def test_after_fuzzing_the_sdk_still_trains_and_samples(
    fuzz_server: Server, targets: Targets
) -> None:
    """Runs after the fuzzers (file order): the server is alive, has logged no traceback, and
    a fresh client's loss falls on a fixed datum; sampling works."""
    sc = fuzz_server.client("tml-fuzz-after")
    tc = sc.create_lora_training_client(base_model=fuzz_server.model, rank=4, seed=1).result()
    datum = sft_datum([10, 20, 30, 40, 50, 60, 70, 80])
    losses = []
    for _ in range(4):
        out = tc.forward_backward([datum], "cross_entropy").result(timeout=120)
        losses.append(out.metrics["loss:sum"])
        tc.optim_step(adam(5e-2)).result(timeout=120)
    assert losses[-1] < losses[0] * 0.9, losses
    sampler = tc.save_weights_and_get_sampling_client().result()
    seq = sampler.sample(
        types.ModelInput.from_ints([10, 20, 30]),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=4, temperature=1.0, seed=3, stop=[]),
    ).result(timeout=120)
    assert len(seq.sequences) == 2 and all(len(s.tokens) == 4 for s in seq.sequences)
    log = fuzz_server.log()
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 : log.find("Traceback") + 3000]
