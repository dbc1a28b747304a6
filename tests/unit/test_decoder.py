"""tinkerd's own decode step (model/decoder.py) and its KV arena (model/decode_batch.py
`ArenaBatch`) against transformers' forward pass, on tiny random-init models (float32) of
each family it serves, with LoRA adapters and base-model rows mixed in one batch.

Each row's reference is transformers' forward over that row's whole sequence alone, under
its adapter: the decode step must give the same next-token logits however the batch was
assembled, after rows joined with ragged prompt lengths and others left (moving rows into
the freed slots of the arena).
"""

from pathlib import Path

import pytest
import torch
import transformers as tf
from lineup.families import TEXT, UNTIED, build, gemma2, llama3, mistral, phi3, qwen3, qwen3_moe
from numerics import assert_close_scaled

from tinkerd.model import decoder
from tinkerd.model.decode_batch import ArenaBatch, full_cache
from tinkerd.model.loading import load_base_model
from tinkerd.model.lora import LoraConfig, MultiLoraModel, segments_for
from tinkerd.model.training import body, unembed

TERMS = 512  # longest sum behind a logit (vocabulary 320, MLP width 128), rounded up


def qwen2() -> tuple[type, object]:
    """Qwen2: biases on q/k/v."""
    return tf.Qwen2ForCausalLM, tf.Qwen2Config(**TEXT, **UNTIED)


def mistral_full() -> tuple[type, object]:
    """Mistral as most checkpoints ship it: no sliding window."""
    return tf.MistralForCausalLM, tf.MistralConfig(**TEXT, **UNTIED, sliding_window=None)


def qwen2_sliding() -> tuple[type, object]:
    """Qwen2 with its sliding window on the second layer only (`layer_types`)."""
    config = tf.Qwen2Config(
        **TEXT, **UNTIED, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    assert config.layer_types == ["full_attention", "sliding_attention"]
    return tf.Qwen2ForCausalLM, config


# Sequences here grow to 50+ positions: well past the 8-position windows.
SERVED = {
    "llama3": llama3,
    "qwen2": qwen2,
    "qwen2_sliding": qwen2_sliding,
    "qwen3": qwen3,
    "mistral": mistral_full,
    "mistral_sliding": mistral,
}


def _lora(family: object, path: Path) -> MultiLoraModel:
    base = load_base_model(str(build(family, path / "model")), data_dir=path / "data")
    lora = MultiLoraModel(base.model)
    gen = torch.Generator().manual_seed(3)
    for name, rank in (("a", 4), ("b", 8)):
        adapter = lora.add_adapter(name, LoraConfig(rank=rank, seed=rank))
        with torch.no_grad():
            for key, p in adapter.params.items():
                if key.endswith("lora_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return lora


def _reference(lora: MultiLoraModel, tokens: list[int], route: str | None) -> torch.Tensor:
    with torch.no_grad(), lora.route(segments_for([route])):
        hidden = body(lora.model)(input_ids=torch.tensor([tokens])).last_hidden_state
        return unembed(lora, hidden[:, -1]).float()[0]


def _prompt_kv(lora: MultiLoraModel, tokens: list[int], route: str | None) -> tuple:
    """The prompt's KV and next-token logits from transformers (as the engine's prefill)."""
    cache = full_cache(lora.model.config)  # every position, also of sliding layers
    with torch.no_grad(), lora.route(segments_for([route])):
        hidden = body(lora.model)(
            input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True
        ).last_hidden_state
        logits = unembed(lora, hidden[:, -1]).float()
    return [(layer.keys, layer.values) for layer in cache.layers], logits


@pytest.mark.parametrize(
    ("name", "packed", "fused"),
    [(name, True, True) for name in sorted(SERVED)]
    + [("llama3", False, False), ("qwen2_sliding", True, False), ("qwen3", True, False)],
)
def test_decode_matches_transformers(
    name: str, packed: bool, fused: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`packed` False: plain `F.linear` per projection, the path off CPU (no weight copy).
    `fused` False: eager ops instead of the fused kernels (model/kernels), as where they
    cannot be built or off CPU."""
    if not packed:
        monkeypatch.setattr(decoder, "mkldnn_packing", lambda device, dtype: False)
    lora = _lora(SERVED[name], tmp_path)
    assert decoder.supports(lora.model)
    batch = ArenaBatch(decoder.Decoder(lora, torch.float32, fused=fused))
    assert batch.decoder.fused is fused
    assert batch.arena.keys_transposed is fused
    gen = torch.Generator().manual_seed(0)
    seqs: list[list[int]] = []
    routes: list[str | None] = []

    def join(lengths: list[int], new_routes: list[str | None]) -> None:
        kvs, logits = [], []
        for n, route in zip(lengths, new_routes, strict=True):
            tokens = torch.randint(0, 256, (n,), generator=gen).tolist()
            kv, first = _prompt_kv(lora, tokens, route)
            kvs.append(kv)
            logits.append(first)
            seqs.append(tokens)
        routes.extend(new_routes)
        order = batch.add(new_routes, kvs, torch.cat(logits))
        assert order == list(range(len(seqs)))

    def decode_and_check() -> None:
        assert batch.logits is not None
        nxt = batch.logits.argmax(-1).tolist()
        for i, token in enumerate(nxt):
            seqs[i].append(token)
        batch.decode(nxt)
        for i, (tokens, route) in enumerate(zip(seqs, routes, strict=True)):
            assert_close_scaled(
                batch.logits[i], _reference(lora, tokens, route), terms=TERMS, msg=f"row {i}"
            )

    join([3, 9, 14, 6], ["a", None, "b", "a"])
    decode_and_check()
    join([5, 11], ["b", None])  # ragged lengths joining a running batch
    decode_and_check()
    decode_and_check()
    order = batch.keep([1, 3, 4])  # rows past the new end move into the freed slots
    assert sorted(order) == [1, 3, 4] and order != [1, 3, 4]
    seqs[:] = [seqs[i] for i in order]
    routes[:] = [routes[i] for i in order]
    assert batch.routes == routes
    decode_and_check()
    join([7], [None])
    for _ in range(40):  # past the arena's first block of positions: it grows in place
        decode_and_check()
    batch.keep([])
    assert batch.arena.rows == 0 and batch.logits is None


@pytest.mark.parametrize("family", [gemma2, phi3, qwen3_moe])
def test_other_families_keep_transformers_forward(family: object, tmp_path: Path) -> None:
    """Other norms and activations, fused projections and experts are not the decoder's
    arithmetic: those models decode through transformers (PaddedBatch)."""
    base = load_base_model(str(build(family, tmp_path / "model")), data_dir=tmp_path / "data")
    assert not decoder.supports(base.model)


@pytest.mark.parametrize("transposed", [False, True])
def test_arena_growth_keeps_what_was_written(transposed: bool) -> None:
    """`transposed`: keys stored (slots, heads, dim, positions), the fused kernels' layout."""
    arena = decoder.KVArena(2, 1, 4, torch.float32, torch.device("cpu"), transposed)
    arena.reserve(2, 5)
    kv = [(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)) for _ in range(2)]
    arena.write_prompt(1, kv)
    arena.rows = 2
    arena.reserve(20, 200)
    rows, positions = arena.capacity
    assert rows >= 20 and positions >= 200 and positions % arena.block == 0
    assert arena.keys[0].shape[-1] == (positions if transposed else 4)

    def keys(layer: int, slot: int) -> torch.Tensor:  # (heads, positions, dim) either way
        k = arena.keys[layer][slot]
        return k.transpose(1, 2) if transposed else k

    for layer, (k, v) in enumerate(kv):
        assert torch.equal(keys(layer, 1)[:, :5], k[0])
        assert torch.equal(arena.values[layer][1, :, :5], v[0])
    arena.move(1, 0, 5)
    assert torch.equal(keys(0, 0)[:, :5], kv[0][0][0])
    assert torch.equal(arena.values[1][0, :, :5], kv[1][1][0])


@pytest.mark.parametrize("name", sorted(SERVED))
def test_prefill_matches_transformers(name: str, tmp_path: Path) -> None:
    """`Decoder.prefill`: chunks of ragged lengths, from position 0 or after a prefix's KV,
    under different adapters, in one pass (rows sharing a slot at successive positions):
    each chunk's hidden states, its prompt's KV and (for a prompt's last chunk) its
    next-token logits equal transformers' forward over the whole prompt. 20-token prompts
    run past the sliding windows (8)."""
    lora = _lora(SERVED[name], tmp_path)
    dec = decoder.Decoder(lora, torch.float32)
    assert dec.can_prefill
    gen = torch.Generator().manual_seed(5)
    cases = [(9, 0, "a", True), (20, 6, None, True), (14, 11, "b", False), (3, 0, None, True)]
    prompts, chunks, refs = [], [], []
    for length, start, route, last in cases:
        tokens = torch.randint(0, 256, (length,), generator=gen).tolist()
        end = length if last else length - 2
        prefix = _prompt_kv(lora, tokens[:start], route)[0] if start else []
        chunks.append(decoder.PrefillChunk(tokens[start:end], start, prefix, route, last))
        cache = full_cache(lora.model.config)
        with torch.no_grad(), lora.route(segments_for([route])):
            hidden = body(lora.model)(
                input_ids=torch.tensor([tokens[:end]]), past_key_values=cache, use_cache=True
            ).last_hidden_state[0]
            logits = unembed(lora, hidden[-1:]).float()[0]
        refs.append((hidden[start:end], [(la.keys, la.values) for la in cache.layers], logits))
        prompts.append(tokens)
    got = dec.prefill(chunks)
    for i, (out, (hidden, kv, logits)) in enumerate(zip(got, refs, strict=True)):
        assert_close_scaled(out.hidden, hidden, terms=TERMS, msg=f"hidden {i}")
        for (k, v), (want_k, want_v) in zip(out.kv, kv, strict=True):
            assert_close_scaled(k, want_k, terms=TERMS, msg=f"keys {i}")
            assert_close_scaled(v, want_v, terms=TERMS, msg=f"values {i}")
        if chunks[i].last:
            assert out.logits is not None
            assert_close_scaled(out.logits, logits, terms=TERMS, msg=f"logits {i}")
        else:
            assert out.logits is None
