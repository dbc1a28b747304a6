"""Continuous batching through the official SDK and a real `tinkerd serve`: concurrent
clients' samples decode together and still get exactly what each gets alone; training is not
held up by a long sample (the scheduler's fairness rule, by ordering); the prompt prefix cache
reports its hits in /metrics.
"""

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from e2e_helpers import Server, adam, run_server, sft_datum
from tinker import types

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tiny_model_dir, tmp_path_factory.mktemp("cb")) as server:
        yield server


@pytest.fixture(scope="module")
def service(srv: Server) -> Iterator[tinker.ServiceClient]:
    client = srv.client("tml-cb")
    yield client
    with contextlib.suppress(Exception):
        client.close("success").result(timeout=10)


def _prompt(i: int, length: int = 6) -> types.ModelInput:
    return types.ModelInput.from_ints([(31 * i + 7 * j) % 200 + 20 for j in range(length)])


def _params(seed: int, tokens: int = 12) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, stop=[])


def _tokens(response: types.SampleResponse) -> list[list[int]]:
    return [list(s.tokens) for s in response.sequences]


def test_concurrent_clients_get_what_they_get_alone(
    srv: Server, service: tinker.ServiceClient
) -> None:
    trainer = service.create_lora_training_client(base_model=srv.model, rank=4).result()
    trainer.forward_backward([sft_datum(list(range(30, 50)))], "cross_entropy").result()
    trainer.optim_step(adam(0.05)).result()
    tuned = trainer.save_weights_and_get_sampling_client().result()
    samplers = [service.create_sampling_client(base_model=srv.model).result() for _ in range(3)]
    samplers.append(tuned)
    work = [(c, i) for c in range(len(samplers)) for i in range(6)]

    async def together() -> list[types.SampleResponse]:
        return await asyncio.gather(
            *(
                samplers[c].sample_async(_prompt(i), 2 if i % 2 else 1, _params(100 * c + i, 8 + i))
                for c, i in work
            )
        )

    concurrent = asyncio.run(together())
    for (c, i), got in zip(work, concurrent, strict=True):
        alone = samplers[c].sample(_prompt(i), 2 if i % 2 else 1, _params(100 * c + i, 8 + i))
        assert _tokens(got) == _tokens(alone.result()), (c, i)
        assert all(len(s.tokens) == 8 + i for s in got.sequences)
    # The tuned adapter's rows were routed to its weights, not the base model's.
    base = samplers[0].sample(_prompt(0), 1, _params(0, 8)).result()
    tuned_out = tuned.sample(_prompt(0), 1, _params(0, 8)).result()
    assert base.sequences[0].logprobs != tuned_out.sequences[0].logprobs


def test_training_is_not_held_up_by_a_long_sample(
    srv: Server, service: tinker.ServiceClient
) -> None:
    """A training step submitted while a long sample decodes completes before the sample."""
    sampler = service.create_sampling_client(base_model=srv.model).result()
    long = sampler.sample(_prompt(1), 128, _params(5, 480))
    trainer = service.create_lora_training_client(base_model=srv.model, rank=4).result()
    order: list[str] = []
    lock = threading.Lock()

    def wait_sample() -> None:
        long.result()
        with lock:
            order.append("sample")

    waiter = threading.Thread(target=wait_sample)
    waiter.start()
    trainer.forward_backward([sft_datum(list(range(60, 90)))], "cross_entropy").result()
    trainer.optim_step(adam(0.01)).result()
    with lock:
        order.append("training")
    waiter.join(timeout=600)
    assert order == ["training", "sample"]
    assert len(long.result().sequences) == 128


def test_prefix_cache_hits_are_in_metrics(srv: Server, service: tinker.ServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=srv.model).result()
    group = _prompt(3, length=40)  # two whole 16-token blocks: a GRPO group's shared prompt
    first = sampler.sample(group, 4, _params(1)).result()
    again = [sampler.sample(group, 4, _params(1)) for _ in range(3)]
    for future in again:
        assert _tokens(future.result()) == _tokens(first)
    text = httpx.get(f"{srv.base_url}/metrics").text
    hits = re.search(r'^tinkerd_prefix_cache_hits_total\{model="[^"]*"\} (\S+)$', text, re.M)
    lookups = re.search(r'^tinkerd_prefix_cache_lookups_total\{model="[^"]*"\} (\S+)$', text, re.M)
    assert hits is not None and lookups is not None, text[-2000:]
    assert float(hits.group(1)) >= 3
    assert float(lookups.group(1)) >= float(hits.group(1)) + 1
