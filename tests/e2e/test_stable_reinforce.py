"""stable_reinforce through the SDK: recorded sequences, provenance checks, staleness.

Samples are taken with `record_stability_info=True`; datums carry provenance exactly as the
cookbook's `rl_loop.with_sampled_provenance` builds it. The reward is the one of test_rl.py
(the fraction of sampled ids below SPLIT), so a few steps move it clearly.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tinker
from e2e_helpers import Server, adam, run_server, sft_datum
from tinker import types
from tinker_cookbook.completers import TokensWithLogprobs
from tinker_cookbook.rl.data_processing import trajectory_to_data
from tinker_cookbook.rl.types import Trajectory, Transition

SPLIT = 128
PROMPT = [104, 101, 108, 108, 111]  # "hello"
NUM_SAMPLES = 16
MAX_TOKENS = 4
KEY = "tml-stable-reinforce"
SFT_LR = 0.01  # the off-policy test's drift steps


def reward(tokens: list[int]) -> float:
    return sum(t < SPLIT for t in tokens) / len(tokens)


def provenance_datum(
    prompt: list[int], seq: types.SampledSequence, advantage: float
) -> types.Datum:
    """The cookbook's shape (rl_loop.py): input = prompt + sampled[:-1], targets shifted."""
    tokens = prompt + list(seq.tokens)
    n_prompt = len(prompt) - 1
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * n_prompt + list(seq.logprobs),
            "advantages": [0.0] * n_prompt + [advantage] * len(seq.tokens),
        },
    )
    sid = seq.sequence_id
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sid, length=len(prompt)),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=len(prompt) - 1),
            types.SampledProvenanceSpan(sequence_id=sid, length=len(seq.tokens)),
        ],
    )


def sample_recorded(
    tc: tinker.TrainingClient, seed: int, temperature: float = 1.0
) -> list[types.SampledSequence]:
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    params = types.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=temperature, seed=seed, stop=[]
    )
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), NUM_SAMPLES, params).result()
    return list(res.sequences)


def group_data(seqs: list[types.SampledSequence]) -> list[types.Datum]:
    r = np.array([reward(list(s.tokens)) for s in seqs])
    adv = r - r.mean()
    return [provenance_datum(PROMPT, s, float(a)) for s, a in zip(seqs, adv, strict=True)]


def test_stable_reinforce_reward_rises_on_policy(clients, server: Server) -> None:
    tc = clients(KEY).create_lora_training_client(base_model=server.model, rank=8, seed=1)
    tc = tc.result()
    rewards = []
    for step in range(10):
        seqs = sample_recorded(tc, seed=step)
        rewards.append(np.mean([reward(list(s.tokens)) for s in seqs]))
        out = tc.forward_backward(group_data(seqs), "stable_reinforce").result(timeout=120)
        m = out.metrics
        # On-policy at temperature 1: ratios ~1, nothing clipped or masked, staleness 0.
        assert m["stable_reinforce/ratio:mean"] == pytest.approx(1.0, abs=1e-3)
        assert m["stable_reinforce/clipped_frac:mean"] == 0.0
        assert m["stable_reinforce/token_masked_frac:mean"] == 0.0
        assert m["stable_reinforce/sequence_masked_frac:mean"] == 0.0
        assert m["stable_reinforce/staleness:max"] == 0.0
        tc.optim_step(adam(0.05)).result(timeout=60)
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards


def test_off_policy_importance_sampling_blows_up_stable_reinforce_does_not(
    clients, server: Server
) -> None:
    """Samples from weights several steps old, after SFT has made exactly those sampled
    tokens far likelier: importance_sampling's unbounded ratios blow the gradient up, while
    stable_reinforce masks the drifted tokens and its gradient stays at on-policy size."""
    tc = clients(KEY).create_lora_training_client(base_model=server.model, rank=8, seed=2)
    tc = tc.result()
    seqs = sample_recorded(tc, seed=7)
    data = group_data(seqs)

    fresh_is = grad_norm_of(tc, data, "importance_sampling")
    fresh_sr = grad_norm_of(tc, data, "stable_reinforce")
    assert fresh_sr == pytest.approx(fresh_is, rel=1e-3)  # on-policy they agree
    for _ in range(6):  # make the sampled tokens much more likely: the data is now stale
        sft = [sft_datum(PROMPT + list(s.tokens)) for s in seqs]
        tc.forward_backward(sft, "cross_entropy").result(timeout=120)
        # A step size at which these 6 steps raise the sampled tokens' likelihood steadily
        # for any sample draw (0.05 overshoots: for some draws it lowers them instead).
        tc.optim_step(adam(SFT_LR)).result(timeout=60)
    stale_is = grad_norm_of(tc, data, "importance_sampling")
    out = tc.forward_backward(data, "stable_reinforce").result(timeout=120)
    stale_sr = tc.optim_step(adam(0.0)).result(timeout=60).metrics["grad_norm:max"]
    # Plain REINFORCE at the current weights (importance_sampling with the current logprobs
    # as the behaviour: ratio 1): the scale a stable off-policy gradient should keep.
    now = tc.forward(data, "importance_sampling").result(timeout=120)
    on_policy = [
        types.Datum(
            model_input=d.model_input,
            loss_fn_inputs={**d.loss_fn_inputs, "logprobs": o["logprobs"]},
        )
        for d, o in zip(data, now.loss_fn_outputs, strict=True)
    ]
    plain = grad_norm_of(tc, on_policy, "importance_sampling")
    # Not one draw's luck: this test passed for sample seeds 0-11, and over seeds 0-7
    # stale_is / plain ranged 4.5-17.5 (stale_sr / plain 0-0.4).
    assert stale_is > 3 * plain, (plain, stale_is)
    assert stale_sr < 2 * plain, (plain, stale_sr)
    m = out.metrics
    # 2 + 6 + 1 optim steps (lr 0 steps count too) since the sampled weights were frozen.
    assert m["stable_reinforce/staleness:max"] == 9.0
    assert m["stable_reinforce/ratio:mean"] > 2.0
    assert m["stable_reinforce/clipped_frac:mean"] > 0.0
    assert m["stable_reinforce/token_masked_frac:mean"] > 0.1


def grad_norm_of(tc: tinker.TrainingClient, data: list[types.Datum], loss_fn: str) -> float:
    """The gradient norm of one forward_backward (an lr-0 optim_step reports it)."""
    tc.forward_backward(data, loss_fn).result(timeout=120)
    return tc.optim_step(adam(0.0)).result(timeout=60).metrics["grad_norm:max"]


def raw_datum(
    tokens: list[int],
    targets: list[int],
    advantages: list[float],
    model_input_spans: list,
    loss_fn_input_spans: list,
) -> types.Datum:
    """A datum with provenance as given (no client-side tiling check), to test the server."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, "advantages": advantages},
        model_input_spans=model_input_spans,
        loss_fn_input_spans=loss_fn_input_spans,
    )


def test_provenance_errors_name_datum_field_and_position(
    clients: Callable[[str], tinker.ServiceClient], server: Server
) -> None:
    owner = clients(KEY).create_lora_training_client(base_model=server.model, rank=4)
    owner = owner.result()
    seq = sample_recorded(owner, seed=3)[0]
    good = provenance_datum(PROMPT, seq, 1.0)
    sid = seq.sequence_id
    tokens = PROMPT + list(seq.tokens)
    P, S = types.PromptProvenanceSpan, types.SampledProvenanceSpan
    inp, tgt = tokens[:-1], tokens[1:]
    n_p, n_s = len(PROMPT), len(seq.tokens)
    adv = [0.0] * (n_p - 1) + [1.0] * n_s
    good_in = [P(sequence_id=sid, length=n_p), S(sequence_id=sid, length=n_s - 1)]
    good_tgt = [P(sequence_id=sid, offset=1, length=n_p - 1), S(sequence_id=sid, length=n_s)]
    wrong = (seq.tokens[1] + 1) % 256
    cases = [
        ("no provenance", sft_datum(tokens), ["data[0]", "needs provenance"]),
        (
            "short tiling",
            raw_datum(inp, tgt, adv, good_in[:1], good_tgt),
            ["data[0].model_input_spans", f"cover {n_p} positions", f"has {len(inp)}"],
        ),
        (
            "unknown id",
            raw_datum(inp, tgt, adv, good_in, [good_tgt[0], S(sequence_id="x:0", length=n_s)]),
            ["data[0].loss_fn_input_spans[1]", "unknown or expired sequence_id 'x:0'"],
        ),
        (
            "index past the request's samples",
            raw_datum(
                inp, tgt, adv, [P(sequence_id=sid[:-1] + "99", length=n_p), *good_in[1:]], good_tgt
            ),
            ["data[0].model_input_spans[0]", "unknown or expired"],
        ),
        (
            "token mismatch",
            raw_datum(inp, [*tgt[:n_p], wrong, *tgt[n_p + 1 :]], adv, good_in, good_tgt),
            ["data[0].loss_fn_input_spans[1]", f"position {n_p}", "sampled token at offset 1"],
        ),
        (
            "offset out of range",
            raw_datum(
                inp, tgt, adv, good_in, [good_tgt[0], S(sequence_id=sid, offset=2, length=n_s)]
            ),
            ["data[0].loss_fn_input_spans[1]", f"[2, {n_s + 2})", "outside"],
        ),
        (
            "advantage on a prompt position",
            raw_datum(inp, tgt, [0.0, 0.5, *adv[2:]], good_in, good_tgt),
            ["data[0].loss_fn_inputs['advantages'][1]", "prompt position"],
        ),
        (
            "bad knob",
            good,
            ["clip_high_threshold must be >= 1"],
        ),
    ]
    for name, datum, needles in cases:
        config = {"clip_high_threshold": 0.5} if name == "bad knob" else None
        with pytest.raises(tinker.BadRequestError) as err:
            owner.forward_backward([good, datum], "stable_reinforce", config).result(timeout=60)
        for needle in needles:
            assert needle.replace("data[0]", "data[1]", 1) in str(err.value) or (
                name == "bad knob" and needle in str(err.value)
            ), (name, str(err.value))
    # Another session of the same user, and another user: exactly like an unknown id.
    for other in (clients(KEY), clients("tml-someone-else")):
        tc = other.create_lora_training_client(base_model=server.model, rank=4).result()
        with pytest.raises(tinker.BadRequestError, match="unknown or expired sequence_id") as e:
            tc.forward_backward([good], "stable_reinforce").result(timeout=60)
        assert f"{sid!r}" in str(e.value)
    # The owner's run went on past every refusal.
    out = owner.forward_backward([good], "stable_reinforce").result(timeout=60)
    assert np.isfinite(out.metrics["loss:sum"])


def logprobs_of(sampler: tinker.SamplingClient) -> list[float]:
    prompt = types.ModelInput.from_ints([*PROMPT, 120, 121, 122])
    return [x for x in sampler.compute_logprobs(prompt).result(timeout=60) if x is not None]


def test_inflight_clients_follow_the_latest_inflight_save(clients, server: Server) -> None:
    tc = clients(KEY).create_lora_training_client(base_model=server.model, rank=8, seed=3)
    tc = tc.result()
    early_inflight = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    before = logprobs_of(snapshot)
    assert logprobs_of(early_inflight) == pytest.approx(before, abs=1e-6)
    tc.forward_backward([sft_datum([*PROMPT, 120, 121, 122])], "cross_entropy").result()
    tc.optim_step(adam(0.05)).result(timeout=60)
    # Not yet published: the inflight target is still the old weights.
    assert logprobs_of(early_inflight) == pytest.approx(before, abs=1e-6)
    late_inflight = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    after = logprobs_of(late_inflight)
    assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 1e-2
    assert logprobs_of(early_inflight) == pytest.approx(after, abs=1e-6)
    assert logprobs_of(snapshot) == pytest.approx(before, abs=1e-6)


def test_sequence_records_survive_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Records are stored durably: the same session trains on them after a restart (its
    SDK client simply reconnects to the same address), while a new session cannot."""
    with run_server(tiny_model_dir, tmp_path) as srv:
        tc = srv.client(KEY).create_lora_training_client(base_model=srv.model, rank=4, seed=4)
        tc = tc.result()
        data = group_data(sample_recorded(tc, seed=11))
        state = tc.save_state("before-restart").result(timeout=60).path
        port = int(srv.base_url.rsplit(":", 1)[1])
    with run_server(tiny_model_dir, tmp_path, port=port) as srv:
        out = tc.forward_backward(data, "stable_reinforce").result(timeout=120)
        assert np.isfinite(out.metrics["loss:sum"])
        other = srv.client(KEY).create_training_client_from_state(state).result(timeout=60)
        with pytest.raises(tinker.BadRequestError, match="unknown or expired"):
            other.forward_backward(data, "stable_reinforce").result(timeout=60)


def test_multi_turn_provenance_built_by_the_cookbook(clients, server: Server) -> None:
    """Two turns where the second prompt resends the first turn (prompt + answer + a new
    observation): the cookbook's own `trajectory_to_data` turns them into one datum whose
    provenance names both sequences, the second by a prompt span at an offset."""
    tc = clients(KEY).create_lora_training_client(base_model=server.model, rank=4, seed=6)
    tc = tc.result()
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    params = types.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=50, seed=1, stop=[])

    def turn(prompt: list[int]) -> TokensWithLogprobs:
        [seq] = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences
        return TokensWithLogprobs(
            list(seq.tokens), list(seq.logprobs), seq.stop_reason, sequence_id=seq.sequence_id
        )

    ob1 = list(PROMPT)
    ac1 = turn(ob1)
    ob2 = [*ob1, *ac1.tokens, 32, 63, 32]  # the history and a new observation
    ac2 = turn(ob2)
    trajectory = Trajectory(
        transitions=[
            Transition(types.ModelInput.from_ints(ob1), ac1, 0.0, False),
            Transition(types.ModelInput.from_ints(ob2), ac2, 1.0, True),
        ],
        final_ob=types.ModelInput.from_ints([]),
    )
    [datum] = trajectory_to_data(trajectory, traj_advantage=0.5)
    assert datum.loss_fn_input_spans is not None
    spans = datum.model_input_spans
    assert spans is not None and [type(s).__name__ for s in spans] == [
        "PromptProvenanceSpan",
        "SampledProvenanceSpan",
        "PromptProvenanceSpan",
        "SampledProvenanceSpan",
    ]
    assert spans[2].offset == len(ob1) + len(ac1.tokens)
    datum = types.Datum(  # the cookbook strips `mask` before sending (rl/train.py)
        model_input=datum.model_input,
        loss_fn_inputs={k: v for k, v in datum.loss_fn_inputs.items() if k != "mask"},
        model_input_spans=datum.model_input_spans,
        loss_fn_input_spans=datum.loss_fn_input_spans,
    )
    out = tc.forward_backward([datum], "stable_reinforce").result(timeout=120)
    m = out.metrics
    assert np.isfinite(m["loss:sum"]) and m["loss:sum"] != 0.0
    # Fresh samples: no drift; at temperature 0.8 with top-k the behaviour distribution is
    # not the policy's, so the ratios differ from 1 but nothing is masked.
    assert m["stable_reinforce/token_masked_frac:mean"] == 0.0
    assert m["stable_reinforce/sequence_masked_frac:mean"] == 0.0
    assert m["stable_reinforce/ratio:mean"] != pytest.approx(1.0, abs=1e-3)
