"""The REST management API (RestClient) with per-user isolation, and error reporting."""

import numpy as np
import pytest
import tinker
from e2e_helpers import adam, sft_datum
from tinker import types

SEQ = [114, 101, 115, 116, 32, 97, 112, 105]  # "rest api"


@pytest.mark.filterwarnings("ignore:.*create_rest_client:FutureWarning")
def test_rest_runs_checkpoints_and_isolation(clients, server) -> None:
    owner = clients("tml-rest-owner")
    tc = owner.create_lora_training_client(base_model=server.model, rank=4, seed=2).result()
    tc.forward_backward([sft_datum(SEQ)], "cross_entropy")
    tc.optim_step(adam(1e-2)).result()
    state_path = tc.save_state("rest-state").result().path
    sampler_path = tc.save_weights_for_sampler("rest-sampler").result().path
    run_id = tc.model_id

    rest = owner.create_rest_client()
    runs = rest.list_training_runs().result()
    assert run_id in [r.training_run_id for r in runs.training_runs]
    run = rest.get_training_run_by_tinker_path(state_path).result()
    assert run.training_run_id == run_id
    assert run.base_model == server.model
    assert run.is_lora and run.lora_rank == 4
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == state_path
    assert run.last_sampler_checkpoint is not None
    assert run.last_sampler_checkpoint.tinker_path == sampler_path

    listed = {c.checkpoint_id: c for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert set(listed) == {"weights/rest-state", "sampler_weights/rest-sampler"}
    assert listed["weights/rest-state"].checkpoint_type == "training"
    assert listed["sampler_weights/rest-sampler"].checkpoint_type == "sampler"
    assert listed["weights/rest-state"].tinker_path == state_path
    assert all((c.size_bytes or 0) > 0 for c in listed.values())

    # Another user sees nothing and can touch nothing.
    other = clients("tml-rest-intruder")
    other_rest = tinker.RestClient(base_url=server.base_url, api_key="tml-rest-intruder")
    assert run_id not in [
        r.training_run_id for r in other_rest.list_training_runs().result().training_runs
    ]
    with pytest.raises(tinker.NotFoundError):
        other_rest.get_training_run(run_id).result()
    with pytest.raises(tinker.NotFoundError):
        other_rest.list_checkpoints(run_id).result()
    with pytest.raises(tinker.NotFoundError):
        other_rest.delete_checkpoint(run_id, "weights/rest-state").result()
    with pytest.raises(tinker.NotFoundError):
        other.create_sampling_client(model_path=sampler_path).result()
    with pytest.raises(tinker.NotFoundError):
        other.create_training_client_from_state(state_path).result()
    assert len(rest.list_checkpoints(run_id).result().checkpoints) == 2  # untouched

    # The owner deletes the training checkpoint: gone from the list and unloadable.
    rest.delete_checkpoint(run_id, "weights/rest-state").result()
    remaining = [c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints]
    assert remaining == ["sampler_weights/rest-sampler"]
    with pytest.raises(tinker.NotFoundError):
        owner.create_training_client_from_state(state_path).result()
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint(run_id, "weights/rest-state").result()
    # The sampler checkpoint still works.
    sampler = owner.create_sampling_client(model_path=sampler_path).result()
    lp = sampler.compute_logprobs(types.ModelInput.from_ints(SEQ)).result()
    assert lp[0] is None and all(np.isfinite(lp[1:]))


def test_bad_token_ids_are_a_clear_error_and_the_server_keeps_serving(
    service_client, server
) -> None:
    tc = service_client.create_lora_training_client(base_model=server.model, rank=4).result()
    vocab = 320  # the tiny model's vocabulary size
    bad = sft_datum([1, 2, vocab + 5, 3])
    with pytest.raises(tinker.BadRequestError) as err:
        tc.forward_backward([bad], "cross_entropy").result()
    assert err.value.status_code == 400
    message = str(err.value)
    assert f"model_input has token ids outside [0, {vocab})" in message, message

    # The SDK had consumed a seq_id for the rejected request; the server must move past it
    # (it used to wait for that seq_id forever, hanging every later request of the run).
    good = tc.forward_backward([sft_datum([1, 2, 3, 4])], "cross_entropy").result(timeout=60)
    assert np.isfinite(good.metrics["loss:sum"])
    tc.optim_step(adam(1e-2)).result(timeout=60)
    # The same for a rejected save (the name exists and overwrite is off).
    tc.save_state("twice").result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match="already exists"):
        tc.save_state("twice").result(timeout=60)
    # A bad target token is reported too.
    bad_target = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, -1], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(tinker.BadRequestError):
        tc.forward_backward([bad_target], "cross_entropy").result()
    assert np.isfinite(
        tc.forward([sft_datum([5, 6, 7])], "cross_entropy").result(timeout=60).metrics["loss:sum"]
    )


def test_unknown_base_model_is_a_clear_error(service_client, server) -> None:
    with pytest.raises(tinker.NotFoundError) as err:
        service_client.create_lora_training_client(base_model="no-such/model", rank=4).result()
    message = str(err.value)
    assert "no-such/model" in message and "not served" in message, message
    with pytest.raises(tinker.NotFoundError):
        service_client.create_sampling_client(base_model="no-such/model").result()
    # ...and the server still serves the real one.
    tc = service_client.create_lora_training_client(base_model=server.model, rank=4).result()
    assert tc.get_info().model_data.model_name == server.model
