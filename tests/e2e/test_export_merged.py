"""`POST /api/v1/export_merged`: a checkpoint saved through the SDK comes back as signed URLs
of a merged Hugging Face model, which `transformers` loads with the logprobs tinkerd computes;
another user's checkpoint answers 404 like an unknown one until it is published."""

from pathlib import Path

import httpx
import pytest
import torch
from e2e_helpers import adam, output_logprobs, sft_datum
from transformers import AutoModelForCausalLM, AutoTokenizer

SEQ = [109, 101, 114, 103, 101, 100, 32, 109, 111, 100, 101, 108]  # "merged model"
OWNER, OTHER = "tml-merge-owner", "tml-merge-other"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def post(server, api_key: str, path: str) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/api/v1/export_merged",
        json={"path": path},
        headers={"X-API-Key": api_key},
        timeout=300,
    )


def test_export_merged_downloads_a_loadable_model(clients, server, tmp_path: Path) -> None:
    tc = clients(OWNER).create_lora_training_client(base_model=server.model, rank=4, seed=2)
    tc = tc.result()
    for _ in range(3):
        tc.forward_backward([sft_datum(SEQ)], "cross_entropy").result()
        tc.optim_step(adam(5e-2)).result()
    path = tc.save_state("merge").result().path
    expected = output_logprobs(tc.forward([sft_datum(SEQ)], "cross_entropy").result())[0]

    response = post(server, OWNER, path)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tinker_path"] == path and body["untied_lm_head"] is False
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(body["urls"])
    out = tmp_path / "merged"
    out.mkdir()
    for name, url in body["urls"].items():
        got = httpx.get(url, timeout=60)  # the token alone authorises
        assert got.status_code == 200, got.text
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(got.content)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert AutoTokenizer.from_pretrained(out).encode("ab") == [97, 98]
    with torch.no_grad():
        logits = model(torch.tensor([SEQ[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(SEQ[1:])[:, None])[:, 0]
    torch.testing.assert_close(logprobs, torch.tensor(expected), atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(server.model, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(torch.tensor([SEQ[:-1]])).logits[0] - logits).abs().max() > 1e-3

    # Cached: a second call answers the same files at once.
    again = post(server, OWNER, path)
    assert again.status_code == 200 and set(again.json()["urls"]) == set(body["urls"])

    # Another user: 404 exactly as for a path that names nothing, until it is published.
    ghost = path.replace(tc.model_id, tc.model_id.replace(tc.model_id[:8], "0" * 8))
    theirs, unknown = post(server, OTHER, path), post(server, OTHER, ghost)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["detail"].replace(path, "P") == unknown.json()["detail"].replace(
        ghost, "P"
    )
    assert post(server, OWNER, "not-a-path").status_code == 400
    published = httpx.post(
        f"{server.base_url}/api/v1/training_runs/{tc.model_id}/checkpoints/weights/merge/publish",
        headers={"X-API-Key": OWNER},
    )
    assert published.status_code == 200, published.text
    assert post(server, OTHER, path).status_code == 200
