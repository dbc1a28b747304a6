"""Replicas on Ray give the same results as the in-process worker, a replica's death is
invisible to the client, and several base models share one cluster.

One loopback Ray cluster for the module (`ray_head`); each `tinkerd serve --replicas` connects
to it with `--ray-address`. The SDK loop (ray_helpers.training_loop) trains two runs side by
side, samples an ephemeral snapshot of each every 3 steps and saves the final weights. Run
states are written every 2 optim steps, so a lost replica's runs are restored from a stored
state and the requests after it are replayed.
"""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import tinker
from e2e_helpers import adam, run_server, sft_datum
from ray_helpers import (
    RAY_ENV,
    RayNode,
    assert_same,
    final_weights,
    replica_env,
    replicas,
    training_loop,
)
from tinker import types

from tinkerd.store.store import Store


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The loop on one in-process worker (no Ray), and its final weights."""
    workdir = tmp_path_factory.mktemp("inprocess")
    with run_server(tiny_model_dir, workdir, TINKERD_STATE_EVERY="2") as srv:
        trace = training_loop(srv.base_url, str(tiny_model_dir))
        assert replicas(srv)[0]["devices"] == "in-process"
    return trace, final_weights(srv.data_dir, trace)


def test_two_replicas_match_the_in_process_worker(
    tiny_model_dir: Path, tmp_path: Path, ray_head: RayNode, reference
) -> None:
    ref, ref_weights = reference
    env = replica_env(tiny_model_dir, ray_head, 2)
    with run_server(tiny_model_dir, tmp_path, **env) as srv:
        trace = training_loop(srv.base_url, str(tiny_model_dir))
        listing = replicas(srv)
    assert_same(trace, final_weights(srv.data_dir, trace), ref, ref_weights)
    assert [r["state"] for r in listing] == ["ready", "ready"]
    assert sorted(r["runs"] for r in listing) == [1, 1]  # the runs went to different replicas
    pids = {r["pid"] for r in listing}
    assert len(pids) == 2 and os.getpid() not in pids
    assert {r["node"] for r in listing} == {"127.0.0.2"}


@pytest.mark.slow
def test_one_replica_matches_the_in_process_worker(
    tiny_model_dir: Path, tmp_path: Path, ray_head: RayNode, reference
) -> None:
    ref, ref_weights = reference
    with run_server(tiny_model_dir, tmp_path, **replica_env(tiny_model_dir, ray_head, 1)) as srv:
        trace = training_loop(srv.base_url, str(tiny_model_dir))
        listing = replicas(srv)
    assert_same(trace, final_weights(srv.data_dir, trace), ref, ref_weights)
    assert len(listing) == 1 and listing[0]["runs"] == 2


@pytest.mark.slow
def test_sigkill_of_replicas_mid_training_loses_nothing(
    tiny_model_dir: Path, tmp_path: Path, ray_head: RayNode, reference
) -> None:
    """Three SIGKILLs of a busy replica's worker process, each at a random moment of a step
    (steps 1, 4 and 7; at the latest before the next step): the runs move to the other
    replica (or wait for the restarted one), their requests are replayed, and the loop ends
    as the uninterrupted one, with every future complete."""
    ref, ref_weights = reference
    rng = random.Random(20261202)
    killed: list[int] = []
    killers: list[threading.Thread] = []
    with run_server(tiny_model_dir, tmp_path, **replica_env(tiny_model_dir, ray_head, 2)) as srv:

        def kill_a_busy_replica(delay: float) -> None:
            time.sleep(delay)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # a replica that holds runs and answers
                busy = [r for r in replicas(srv) if r["state"] == "ready" and r["runs"]]
                if busy and busy[0]["pid"]:
                    os.kill(busy[0]["pid"], signal.SIGKILL)  # a worker of this test's cluster
                    killed.append(busy[0]["pid"])
                    return
                time.sleep(0.2)

        def on_step(step: int) -> None:
            for killer in killers:  # each kill lands before the next step at the latest
                killer.join(150)
            if step in (1, 4, 7):
                killer = threading.Thread(target=kill_a_busy_replica, args=(rng.uniform(0, 0.8),))
                killer.start()
                killers.append(killer)

        trace = training_loop(srv.base_url, str(tiny_model_dir), on_step=on_step)
        for killer in killers:
            killer.join(150)
        log = srv.log()
        metrics = httpx.get(f"{srv.base_url}/metrics", timeout=30).text
    assert len(killed) == 3, killed
    losses = [ln for ln in metrics.splitlines() if ln.startswith("tinkerd_replica_losses_total")]
    assert len(losses) == 1 and float(losses[0].split()[-1]) == 3, losses
    assert log.count("lost (") >= 3, log[-4000:]
    with Store(f"sqlite:///{srv.data_dir / 'tinkerd.db'}") as store:
        assert store.unfinished_futures() == []
        for model_id in trace.model_ids:
            for rec in store.futures_for_model(model_id):
                assert rec.status == "complete", (rec.kind, rec.seq_id, rec.status, rec.error)
    assert_same(trace, final_weights(srv.data_dir, trace), ref, ref_weights)


# Several base models share one Ray cluster, each with its own replica set: a run of each
# trains and samples on its own model's replica, and the OpenAI-compatible endpoint streams
# from a replica (token deltas cross the process link as data; the scheduler calls the hooks).


def test_two_models_one_cluster(
    tiny_model_dir: Path, tiny_tied_model_dir: Path, tmp_path: Path, ray_head: RayNode
) -> None:
    models = [str(tiny_model_dir), str(tiny_tied_model_dir)]
    env = {
        **RAY_ENV,
        "TINKERD_REPLICAS": json.dumps([f"{m}=1" for m in models]),
        "TINKERD_RAY_ADDRESS": ray_head.address,
    }
    extra = ("--model", str(tiny_tied_model_dir))
    with run_server(tiny_model_dir, tmp_path, extra_args=extra, **env) as srv:
        sc = tinker.ServiceClient(base_url=srv.base_url, api_key="tml-ray")
        losses = {}
        for model in models:
            tc = sc.create_lora_training_client(base_model=model, rank=4, seed=1).result()
            datum = sft_datum(list(range(5, 17)))
            first = tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
            tc.optim_step(adam(5e-2)).result()
            again = tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
            losses[model] = (first, again)
            sampler = tc.save_weights_and_get_sampling_client().result()
            out = sampler.sample(
                types.ModelInput.from_ints([5, 6, 7]),
                1,
                types.SamplingParams(max_tokens=6, seed=3, stop=[]),
            ).result()
            assert len(out.sequences[0].tokens) == 6

        listing = replicas(srv)
        streamed = _stream_completion(srv.base_url, models[1])
        plain = httpx.post(
            f"{srv.base_url}/oai/api/v1/completions",
            headers={"Authorization": "Bearer tml-ray"},
            json={"model": models[1], "prompt": "abc", "max_tokens": 8, "temperature": 0},
            timeout=120,
        ).json()["choices"][0]["text"]

    # The tied and untied models differ: the same datum gives different losses on each.
    assert losses[models[0]][0] != losses[models[1]][0]
    for first, again in losses.values():
        assert again < first  # each run trained on its own model
    assert sorted(r["model"] for r in listing) == sorted(models)
    assert all(r["state"] == "ready" and r["runs"] == 1 for r in listing), listing
    pids = {r["pid"] for r in listing}
    assert len(pids) == 2 and os.getpid() not in pids
    assert streamed == plain  # greedy: the stream's deltas add up to the whole answer


def _stream_completion(base_url: str, model: str) -> str:
    text = []
    with httpx.stream(
        "POST",
        f"{base_url}/oai/api/v1/completions",
        headers={"Authorization": "Bearer tml-ray"},
        json={"model": model, "prompt": "abc", "max_tokens": 8, "temperature": 0, "stream": True},
        timeout=120,
    ) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.extend(c["text"] for c in json.loads(line[6:])["choices"])
    return "".join(text)
