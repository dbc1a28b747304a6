"""`forward_backward_custom`: the SDK runs a forward pass, differentiates the user's loss on the
client and sends a cross-entropy pass with weights = -dLoss/dlogprobs (protocol §5)."""

import dataclasses
import math

import httpx
import numpy as np
import pytest
import tinker
import torch
from e2e_helpers import adam, free_port, output_logprobs, run_server, sft_datum

PROMPT = [81, 58, 32]  # "Q: "
CHOSEN = [121, 101, 115, 33]  # "yes!"
REJECTED = [110, 111, 112, 101]  # "nope"
BETA = 0.5


def completion_datum(completion: list[int]):
    seq = PROMPT + completion
    n = len(seq) - 1
    weights = [0.0] * (len(PROMPT) - 1) + [1.0] * len(completion)
    assert len(weights) == n
    return sft_datum(seq, weights)


def masked_sums(logprobs: list[list[float]], data) -> list[float]:
    return [
        float(np.dot(lp, d.loss_fn_inputs["weights"].tolist()))
        for lp, d in zip(logprobs, data, strict=True)
    ]


def test_dpo_custom_loss_value_and_update(service_client, server) -> None:
    tc = service_client.create_lora_training_client(base_model=server.model, rank=8, seed=3)
    tc = tc.result()
    data = [completion_datum(CHOSEN), completion_datum(REJECTED)]
    ref_c, ref_r = masked_sums(output_logprobs(tc.forward(data, "cross_entropy").result()), data)

    seen: list[list[float]] = []

    def dpo(batch, logprobs):
        seen.extend(lp.detach().tolist() for lp in logprobs)
        w = [torch.tensor(d.loss_fn_inputs["weights"].tolist()) for d in batch]
        chosen = (logprobs[0] * w[0]).sum() - ref_c
        rejected = (logprobs[1] * w[1]).sum() - ref_r
        margin = BETA * (chosen - rejected)
        return -torch.nn.functional.logsigmoid(margin), {"margin:mean": margin.detach().item()}

    losses, margins = [], []
    for _ in range(5):
        seen.clear()
        fb = tc.forward_backward_custom(data, dpo)
        opt = tc.optim_step(adam(1e-2))
        out = fb.result()
        opt.result()
        # The loss the SDK reports is our loss on the logprobs the server returned, and
        # those logprobs are exactly what a plain forward pass gives (no update in between).
        c, r = masked_sums(seen, data)
        expected = -math.log(1 / (1 + math.exp(-BETA * ((c - ref_c) - (r - ref_r)))))
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
        assert "surrogate_loss:sum" in out.metrics
        losses.append(out.metrics["loss:sum"])
        margins.append(out.metrics["margin:mean"])
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at first

    # After the updates, a forward pass shows the preference moved the right way.
    c, r = masked_sums(output_logprobs(tc.forward(data, "cross_entropy").result()), data)
    assert (c - ref_c) - (r - ref_r) > 2.0
    assert c > ref_c and r < ref_r
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    assert margins[-1] > margins[0]


def test_linear_custom_loss_equals_cross_entropy(service_client, server) -> None:
    """-sum(logprobs * w) as a custom loss must train exactly like cross_entropy with w."""
    data = [
        sft_datum([104, 105, 32, 116, 104, 101, 114, 101], [1.0, 0.5, 2.0, 1.0, -0.5, 1.0, 1.0]),
        sft_datum([98, 121, 101, 33, 33], [0.0, 1.0, 1.0, 3.0]),
    ]
    custom_tc = service_client.create_lora_training_client(
        base_model=server.model, rank=8, seed=4
    ).result()
    ce_tc = service_client.create_lora_training_client(
        base_model=server.model, rank=8, seed=4
    ).result()

    def linear(batch, logprobs):
        loss = sum(
            -(lp * torch.tensor(d.loss_fn_inputs["weights"].tolist())).sum()
            for d, lp in zip(batch, logprobs, strict=True)
        )
        return loss, {}

    for _ in range(3):
        custom = tc_step(custom_tc, lambda: custom_tc.forward_backward_custom(data, linear))
        ce = tc_step(ce_tc, lambda: ce_tc.forward_backward(data, "cross_entropy"))
        assert custom.metrics["loss:sum"] == pytest.approx(ce.metrics["loss:sum"], rel=1e-5)
        # The surrogate CE loss equals the custom loss too (weights = -dL/dlp = w).
        assert custom.metrics["surrogate_loss:sum"] == pytest.approx(
            ce.metrics["loss:sum"], rel=1e-5
        )
    after_custom = output_logprobs(custom_tc.forward(data, "cross_entropy").result())
    after_ce = output_logprobs(ce_tc.forward(data, "cross_entropy").result())
    for a, b in zip(after_custom, after_ce, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def tc_step(tc, submit):
    fb = submit()
    opt = tc.optim_step(adam(1e-2))
    out = fb.result()
    opt.result()
    return out


# -- server-side custom losses (create_custom_loss → forward_backward(data, "custom")) --------

HOSTILE_KEY = "tml-custom-hostile"


def neg_ll_margin(logprobs, weights, ref):
    """A per-datum loss with a scalar input and both metric reductions."""
    score = (logprobs * weights).sum()
    loss = -torch.nn.functional.logsigmoid(BETA * (score - ref)) + 0.1 * (logprobs**2).mean()
    return loss, {"custom/score:mean": score.detach(), "custom/loss:sum": loss.detach()}


RANKS = {"logprobs": 1, "weights": 1, "ref": 0}


def margin_data():
    data = [completion_datum(CHOSEN), completion_datum(REJECTED)]
    for d, ref in zip(data, [-3.0, -4.0], strict=True):
        d.loss_fn_inputs["ref"] = tinker.types.TensorData(data=[ref], dtype="float32", shape=[])
    return data


def custom_run(server, sc, steps: int = 2):
    """create_custom_loss, then `steps` of forward_backward_custom + optim_step; the results
    and the logprobs a forward pass gives afterwards."""
    handle = sc.create_custom_loss(neg_ll_margin, input_ranks=RANKS).result()
    tc = sc.create_lora_training_client(base_model=server.model, rank=8, seed=11).result()
    data = margin_data()
    outs = [tc_step(tc, lambda: tc.forward_backward_custom(data, handle)) for _ in range(steps)]
    plain = [completion_datum(CHOSEN), completion_datum(REJECTED)]  # no scalar `ref`
    after = output_logprobs(tc.forward(plain, "cross_entropy").result())
    return handle, tc, outs, after


def fb_requests(server) -> list[tuple[str, bytes]]:
    """(kind, request bytes) of every stored future, oldest first."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{server.data_dir / 'tinkerd.db'}")
    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text("SELECT kind, request FROM futures ORDER BY created_at")
        ).all()
    engine.dispose()
    return [(k, bytes(r)) for k, r in rows]


@pytest.fixture(scope="module")
def client_side_server(tiny_model_dir, tmp_path_factory):
    with run_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("client-side"),
        TINKERD_CUSTOM_LOSS_SERVER_SIDE="false",
    ) as srv:
        yield srv


def test_server_side_custom_loss_matches_client_side(server, client_side_server) -> None:
    sc_server = server.client("tml-custom-server-side")
    sc_client = client_side_server.client("tml-custom-client-side")
    try:
        assert sc_server.holder.get_client_config().custom_loss_server_side
        assert not sc_client.holder.get_client_config().custom_loss_server_side
        h_server, tc_server, outs_server, after_server = custom_run(server, sc_server)
        h_client, _, outs_client, after_client = custom_run(client_side_server, sc_client)
    finally:
        for sc in (sc_server, sc_client):
            sc.close("success").result(timeout=10)
    assert h_server.loss_id is not None and h_client.loss_id is None
    session_id = tc_server.model_id.split(":train:")[0]
    assert h_server.loss_id == f"{session_id}:loss:0"
    for a, b in zip(outs_server, outs_client, strict=True):
        assert set(a.metrics) == set(b.metrics)
        for key in b.metrics:
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-4, abs=1e-5), key
        for oa, ob in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(
                oa["logprobs"].tolist(), ob["logprobs"].tolist(), rtol=1e-5, atol=1e-5
            )
    # Same gradients: the weights after the optimizer steps give the same logprobs.
    for a, b in zip(after_server, after_client, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Server-side: one forward_backward of loss_fn custom per step, no forward-only pass.
    import tinkerd.api.proto as proto

    msgs = []
    for kind, raw in fb_requests(server):
        if kind == "forward_backward":
            msg = proto.ForwardBackwardRequest()
            msg.ParseFromString(raw)
            if msg.model_id == tc_server.model_id:
                msgs.append(msg)
    assert [m.loss_fn for m in msgs] == ["custom", "custom", "cross_entropy"]
    assert msgs[0].loss_fn_config_v2["loss_id"].text == h_server.loss_id


def test_hostile_graph_refused_while_others_train(server, service_client) -> None:
    """A graph calling something off the allowlist gets a 4xx naming the node; another
    client's training on the same server is unaffected."""
    other = service_client.create_lora_training_client(base_model=server.model, rank=4).result()
    data = [sft_datum([104, 105, 33, 33])]
    before = other.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    sc = server.client(HOSTILE_KEY)
    try:
        tc = sc.create_lora_training_client(base_model=server.model, rank=4).result()
        session_id = tc.model_id.split(":train:")[0]
        graph = {
            "format": 1,
            "nodes": [
                {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
                {
                    "op": "call_function",
                    "name": "pwn",
                    "target": "builtins.eval",
                    "args": ["__import__('os').system('touch /tmp/pwned')"],
                },
                {
                    "op": "output",
                    "name": "output",
                    "target": "output",
                    "args": [{"tuple": [{"ref": "pwn"}, {"dict": {}}]}],
                },
            ],
        }
        bombs = [
            graph,
            {
                "format": 1,
                "nodes": [
                    {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
                    {
                        "op": "call_function",
                        "name": "bomb",
                        "target": "torch.zeros",
                        "args": [{"tuple": [10**6, 10**6]}],
                    },
                    {
                        "op": "call_method",
                        "name": "s",
                        "target": "sum",
                        "args": [{"ref": "bomb"}],
                    },
                    {
                        "op": "output",
                        "name": "output",
                        "target": "output",
                        "args": [{"tuple": [{"ref": "s"}, {"dict": {}}]}],
                    },
                ],
            },
        ]
        with httpx.Client(
            base_url=f"{server.base_url}/api/v1", headers={"X-API-Key": HOSTILE_KEY}, timeout=60
        ) as http:
            body = {
                "session_id": session_id,
                "custom_loss_seq_id": 0,
                "name": "pwn",
                "inputs": [{"name": "logprobs", "rank": 1}],
                "graph": graph,
            }
            r = http.post("/create_custom_loss", json=body)
            assert r.status_code == 400, r.text
            assert "'pwn'" in r.json()["detail"] and "builtins.eval" in r.json()["detail"]
            # The memory bomb passes the checks at upload (sizes depend on the datum) and
            # fails its forward_backward as a user error, before allocating.
            body = {**body, "graph": bombs[1], "name": "bomb", "custom_loss_seq_id": 1}
            r = http.post("/create_custom_loss", json=body)
            assert r.status_code == 200, r.text
            loss_id = http.post("/retrieve_future", json=r.json()).json()["loss_id"]
        handle = dataclasses.replace(
            tinker.lib.public_interfaces.LossHandle(
                name="bomb",
                inputs=(tinker.types.CustomLossInput(name="logprobs", rank=1),),
                session_id=session_id,
                graph=None,  # type: ignore[arg-type]
            ),
            loss_id=loss_id,
        )
        with pytest.raises(tinker.RequestFailedError) as info:
            tc.forward_backward_custom(data, handle).result()
        assert "'bomb'" in str(info.value) and "cap for this datum" in str(info.value)
        assert info.value.category == tinker.types.RequestErrorCategory.User
    finally:
        sc.close("success").result(timeout=10)
    after = other.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    assert after == pytest.approx(before, rel=1e-6)


def test_loss_ids_belong_to_their_session_and_user(server, service_client) -> None:
    owner = server.client("tml-custom-owner")
    try:
        handle = owner.create_custom_loss(neg_ll_margin, input_ranks=RANKS).result()
        owner_tc = owner.create_lora_training_client(base_model=server.model, rank=4).result()
        owner_tc.forward_backward_custom(margin_data(), handle).result()
        foreign = {"loss_id": handle.loss_id}
        ghost = {"loss_id": f"{handle.loss_id.split(':')[0][:-4]}beef:loss:0"}
        answers = []
        for sc in (service_client, owner):  # another user; the same user, another session
            if sc is owner:
                sc = server.client("tml-custom-owner")
            tc = sc.create_lora_training_client(base_model=server.model, rank=4).result()
            for config in (foreign, ghost):
                with pytest.raises(tinker.BadRequestError) as info:
                    tc.forward_backward(margin_data(), "custom", config).result()
                body = info.value.response.json()["detail"]
                answers.append(body.replace(config["loss_id"], "<id>"))
        assert len(set(answers)) == 1, answers
        assert "loss_fn_config.loss_id" in answers[0]
    finally:
        owner.close("success").result(timeout=10)


@pytest.mark.slow
def test_custom_loss_survives_restart(tiny_model_dir, tmp_path) -> None:
    """The same clients keep training across a restart (same data dir and port): the run is
    replayed from its log, its custom-loss requests included, and the next
    forward_backward with the same loss_id runs as in an uninterrupted run."""
    port = free_port()
    with run_server(tiny_model_dir, tmp_path, port=port) as srv:
        sc = srv.client()
        handle = sc.create_custom_loss(neg_ll_margin, input_ranks=RANKS).result()
        tc = sc.create_lora_training_client(base_model=srv.model, rank=4, seed=2).result()
        tc_step(tc, lambda: tc.forward_backward_custom(margin_data(), handle))
    with run_server(tiny_model_dir, tmp_path, port=port) as srv:
        second = tc_step(tc, lambda: tc.forward_backward_custom(margin_data(), handle))
        ref_sc = srv.client("tml-custom-reference")
        ref = ref_sc.create_custom_loss(neg_ll_margin, input_ranks=RANKS).result()
        ref_tc = ref_sc.create_lora_training_client(base_model=srv.model, rank=4, seed=2).result()
        outs = [tc_step(ref_tc, lambda: ref_tc.forward_backward_custom(margin_data(), ref))]
        outs.append(tc_step(ref_tc, lambda: ref_tc.forward_backward_custom(margin_data(), ref)))
        assert second.metrics["loss:sum"] == pytest.approx(outs[1].metrics["loss:sum"], rel=1e-5)
        for sc_ in (sc, ref_sc):
            sc_.close("success").result(timeout=10)
