"""SDK chunking of big forward_backward batches, and retried submissions applied once."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_helpers import Server, adam, output_logprobs, run_server, sft_datum
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

FB_POST = '"POST /api/v1/forward_backward HTTP/1.1" 200'


@pytest.fixture(scope="module")
def chunked_server(tiny_model_dir: Path, tmp_path_factory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("chunked")
    with run_server(tiny_model_dir, workdir, TINKERD_FWDBWD_MAX_CHUNK_LEN="2") as srv:
        yield srv


def seven_datums() -> list[types.Datum]:
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(32, 127, size=int(n))) for n in [5, 9, 3, 12, 7, 4, 10]]
    return [sft_datum([int(t) for t in s]) for s in seqs]


def test_sdk_chunks_forward_backward(chunked_server: Server, server: Server, clients) -> None:
    data = seven_datums()
    sc = chunked_server.client("tml-chunk")
    try:
        chunked = sc.create_lora_training_client(base_model=chunked_server.model, rank=8, seed=21)
        chunked = chunked.result()
        plain = clients("tml-chunk").create_lora_training_client(
            base_model=server.model, rank=8, seed=21
        )
        plain = plain.result()

        posts_before = chunked_server.count_in_log(FB_POST)
        out = chunked.forward_backward(data, "cross_entropy")
        opt = chunked.optim_step(adam(1e-2))
        result = out.result()
        opt.result()
        time.sleep(0.2)  # let the access log line reach the file
        assert chunked_server.count_in_log(FB_POST) - posts_before == 4  # ceil(7 / 2)

        ref = plain.forward_backward(data, "cross_entropy")
        plain.optim_step(adam(1e-2)).result()
        ref_result = ref.result()

        # 7 outputs, in request order, equal to the unchunked batch.
        assert len(result.loss_fn_outputs) == 7
        got, want = output_logprobs(result), output_logprobs(ref_result)
        for d, g, w in zip(data, got, want, strict=True):
            assert len(g) == d.model_input.length
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert result.metrics["loss:sum"] == pytest.approx(ref_result.metrics["loss:sum"], 1e-5)
        assert result.metrics["loss:sum"] == pytest.approx(-sum(map(sum, got)), rel=1e-4)

        # The gradients of the 4 chunks accumulated into one step: same weights afterwards.
        after_chunked = output_logprobs(chunked.forward(data, "cross_entropy").result())
        after_plain = output_logprobs(plain.forward(data, "cross_entropy").result())
        for a, b in zip(after_chunked, after_plain, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert sum(map(sum, after_chunked)) > sum(map(sum, got))
    finally:
        sc.close("success").result(timeout=10)


# -- retried submissions ----------------------------------------------------------------


class Raw:
    """The protocol by hand: the same bytes can be posted as often as we like."""

    def __init__(self, server: Server, api_key: str) -> None:
        self.http = httpx.Client(
            base_url=server.base_url + "/api/v1", headers={"X-API-Key": api_key}, timeout=30
        )

    def fb_body(self, model_id: str, seq_id: int, data, *, forward_only: bool = False) -> bytes:
        req = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data, "cross_entropy"),
            model_id=model_id,
            seq_id=seq_id,
        )
        msg = forward_backward_request_to_proto(req)
        msg.forward_only = forward_only
        return msg.SerializeToString()

    def post_fb(self, body: bytes) -> str:
        r = self.http.post(
            "/forward_backward",
            content=body,
            headers={"Content-Type": "application/x-protobuf"},
        )
        r.raise_for_status()
        return r.json()["request_id"]

    def post_json(self, path: str, body: dict) -> str:
        r = self.http.post(path, json=body)
        r.raise_for_status()
        return r.json()["request_id"]

    def result(self, request_id: str, *, proto: bool) -> object:
        accept = "application/x-protobuf" if proto else "application/json"
        for _ in range(20):
            r = self.http.post(
                "/retrieve_future",
                json={"request_id": request_id, "allow_metadata_only": False},
                headers={"Accept": accept},
            )
            r.raise_for_status()
            if "application/x-protobuf" in r.headers["content-type"]:
                return deserialize_forward_backward_output(r.content)
            body = r.json()
            assert "error" not in body, body
            if body.get("type") != "try_again":
                return body
        raise AssertionError(f"request {request_id} never finished")


def test_retried_submissions_apply_once(service_client, server) -> None:
    data = [sft_datum([100, 101, 100, 117, 112, 101, 33]), sft_datum([111, 110, 99, 101])]
    adam_params = {
        "learning_rate": 2e-2,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }
    tc = service_client.create_lora_training_client(base_model=server.model, rank=8, seed=31)
    model_id = tc.result().model_id
    raw = Raw(server, "tml-e2e")

    # forward_backward (seq 1): the same protobuf bytes twice → one request.
    fb_body = raw.fb_body(model_id, 1, data)
    fb_ids = {raw.post_fb(fb_body), raw.post_fb(fb_body)}
    assert len(fb_ids) == 1
    fb_id = fb_ids.pop()
    fb_out = raw.result(fb_id, proto=True)
    assert raw.post_fb(fb_body) == fb_id  # a late retry, after completion, too

    # optim_step (seq 2): the same JSON twice → one request.
    optim = {"model_id": model_id, "seq_id": 2, "type": "optim_step", "adam_params": adam_params}
    opt_ids = {raw.post_json("/optim_step", optim), raw.post_json("/optim_step", optim)}
    assert len(opt_ids) == 1
    opt_id = opt_ids.pop()
    opt_out = raw.result(opt_id, proto=False)
    assert raw.post_json("/optim_step", optim) == opt_id

    after = raw.result(raw.post_fb(raw.fb_body(model_id, 3, data, forward_only=True)), proto=True)

    # Reference: the same run through the SDK, each request sent once.
    ref = service_client.create_lora_training_client(base_model=server.model, rank=8, seed=31)
    ref = ref.result()
    ref_fb = ref.forward_backward(data, "cross_entropy")
    ref_opt = ref.optim_step(types.AdamParams(**adam_params)).result()
    ref_after = ref.forward(data, "cross_entropy").result()
    assert fb_out.metrics["loss:sum"] == pytest.approx(ref_fb.result().metrics["loss:sum"], 1e-6)
    # Gradients accumulated once (a doubled forward_backward would double the norm)...
    assert opt_out["metrics"]["grad_norm:max"] == pytest.approx(
        ref_opt.metrics["grad_norm:max"], rel=1e-5
    )
    # ...and the weights moved once: identical to the reference, unlike a second step.
    assert after.metrics["loss:sum"] == pytest.approx(ref_after.metrics["loss:sum"], rel=1e-6)
    ref.forward_backward(data, "cross_entropy")
    ref.optim_step(types.AdamParams(**adam_params)).result()
    twice = ref.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert abs(twice - after.metrics["loss:sum"]) > 1e-2 * abs(twice)
