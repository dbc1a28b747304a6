"""The rest of the REST management surface, driven by the official SDK and its `tinker` CLI:
sessions, run metadata, checkpoint TTLs and publishing, external-weights exports and their
signed download URLs, copies, and the hosted-only (billing/admin) calls."""

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from e2e_helpers import adam, sft_datum
from safetensors.torch import load_file
from tinker import types

from tinkerd.checkpoints import downloads

SEQ = [114, 101, 115, 116, 32, 115, 117, 114, 102]  # "rest surf"
TINKER_CLI = Path(sys.executable).parent / "tinker"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def trained_client(sc, server, **kwargs):
    tc = sc.create_lora_training_client(base_model=server.model, rank=4, seed=3, **kwargs)
    tc = tc.result()
    tc.forward_backward([sft_datum(SEQ)], "cross_entropy")
    tc.optim_step(adam(1e-2)).result()
    return tc


def rest_of(server, api_key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=server.base_url, api_key=api_key)


def session_of(model_id: str) -> str:
    return model_id.split(":train:")[0]


def test_sessions_and_run_user_metadata(clients, server) -> None:
    sc = clients("tml-surf-sessions")
    tc = sc.create_lora_training_client(
        base_model=server.model, rank=4, user_metadata={"experiment": "surf", "step": "0"}
    ).result()
    sampler = sc.create_sampling_client(base_model=server.model)
    sampler.compute_logprobs(types.ModelInput.from_ints(SEQ[:4])).result()
    session_id = session_of(tc.model_id)
    rest = rest_of(server, "tml-surf-sessions")

    assert session_id in rest.list_sessions().result().sessions
    got = rest.get_session(session_id).result()
    assert tc.model_id in got.training_run_ids
    assert got.sampler_ids and all(s.startswith(session_id) for s in got.sampler_ids)

    run = rest.get_training_run(tc.model_id).result()
    assert run.user_metadata == {"experiment": "surf", "step": "0"}
    listed = {r.training_run_id: r for r in rest.list_training_runs().result().training_runs}
    assert listed[tc.model_id].user_metadata == {"experiment": "surf", "step": "0"}

    other = rest_of(server, "tml-surf-sessions-other")
    assert session_id not in other.list_sessions().result().sessions
    with pytest.raises(tinker.NotFoundError):
        other.get_session(session_id).result()


def test_checkpoint_ttl_sets_expiry_and_expired_checkpoints_are_deleted(clients, server) -> None:
    sc = clients("tml-surf-ttl")
    tc = trained_client(sc, server)
    path = tc.save_state("ttl").result().path
    rest = rest_of(server, "tml-surf-ttl")

    def listed():
        return {c.tinker_path: c for c in rest.list_user_checkpoints().result().checkpoints}

    assert listed()[path].expires_at is None
    before = datetime.now(UTC)
    rest.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    expires = listed()[path].expires_at
    assert expires is not None
    assert before + timedelta(seconds=7190) < expires < before + timedelta(seconds=7300)
    rest.set_checkpoint_ttl_from_tinker_path(path, None).result()
    assert listed()[path].expires_at is None

    # Other users can't touch it.
    with pytest.raises(tinker.NotFoundError):
        rest_of(server, "tml-surf-ttl-other").set_checkpoint_ttl_from_tinker_path(path, 1).result()

    # Expired: gone from listings, from disk, and unloadable.
    rest.set_checkpoint_ttl_from_tinker_path(path, 1).result()
    time.sleep(1.5)
    assert path not in listed()
    storage = server.data_dir / "checkpoints" / tc.model_id / "weights" / "ttl"
    assert not storage.exists()
    with pytest.raises(tinker.NotFoundError):
        sc.create_training_client_from_state(path).result()

    # A save with a TTL expires too, found on load even before any listing sweeps it.
    short = tc.save_state("short", ttl_seconds=1).result().path
    time.sleep(1.5)
    with pytest.raises(tinker.NotFoundError):
        sc.create_training_client_from_state(short).result()


def test_publish_makes_checkpoints_loadable_by_others(clients, server) -> None:
    owner = clients("tml-surf-publisher")
    tc = trained_client(owner, server)
    state = tc.save_state("pub-state").result().path
    sampler_path = tc.save_weights_for_sampler("pub-sampler").result().path
    rest = rest_of(server, "tml-surf-publisher")
    reader = clients("tml-surf-reader")
    reader_rest = rest_of(server, "tml-surf-reader")

    info = rest.get_weights_info_by_tinker_path(state).result()
    assert info.base_model == server.model and info.is_lora and info.lora_rank == 4

    with pytest.raises(tinker.NotFoundError):
        reader.create_training_client_from_state(state).result()
    with pytest.raises(tinker.NotFoundError):
        reader_rest.get_weights_info_by_tinker_path(state).result()
    with pytest.raises(tinker.NotFoundError):  # only the owner publishes
        reader_rest.publish_checkpoint_from_tinker_path(state).result()

    rest.publish_checkpoint_from_tinker_path(state).result()
    rest.publish_checkpoint_from_tinker_path(sampler_path).result()
    flags = {
        c.tinker_path: c.public for c in rest.list_checkpoints(tc.model_id).result().checkpoints
    }
    assert flags == {state: True, sampler_path: True}

    assert reader_rest.get_weights_info_by_tinker_path(state).result().lora_rank == 4
    copy = reader.create_training_client_from_state(state).result()
    fb = copy.forward([sft_datum(SEQ)], "cross_entropy").result()
    own = tc.forward([sft_datum(SEQ)], "cross_entropy").result()
    np.testing.assert_allclose(fb.metrics["loss:sum"], own.metrics["loss:sum"], rtol=1e-5)
    sampling = reader.create_sampling_client(model_path=sampler_path).result()
    out = sampling.sample(
        types.ModelInput.from_ints(SEQ[:4]), 1, types.SamplingParams(max_tokens=3)
    ).result()
    assert len(out.sequences[0].tokens) >= 1
    # Published is still not owned: the reader can't list, delete or unpublish it.
    with pytest.raises(tinker.NotFoundError):
        reader_rest.list_checkpoints(tc.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        reader_rest.unpublish_checkpoint_from_tinker_path(state).result()
    with pytest.raises(tinker.NotFoundError):
        reader_rest.delete_checkpoint_from_tinker_path(state).result()

    rest.unpublish_checkpoint_from_tinker_path(state).result()
    rest.unpublish_checkpoint_from_tinker_path(sampler_path).result()
    with pytest.raises(tinker.NotFoundError):
        reader.create_training_client_from_state(state).result()
    with pytest.raises(tinker.NotFoundError):
        reader.create_sampling_client(model_path=sampler_path).result()

    # A checkpoint literally named "publish" is still deletable (not taken for an unpublish).
    named = tc.save_state("publish").result().path
    rest.delete_checkpoint_from_tinker_path(named).result()
    assert named not in [
        c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints
    ]


def test_save_weights_external_and_signed_download_urls(clients, server) -> None:
    sc = clients("tml-surf-export")
    tc = trained_client(sc, server)
    path = tc.save_weights_external("hf").result().path
    assert path == f"tinker://{tc.model_id}/external_weights/hf"
    rest = rest_of(server, "tml-surf-export")
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[path].checkpoint_type == "external"
    assert (listed[path].size_bytes or 0) > 0

    response = rest.get_external_weights_urls(path).result()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(response.urls)
    assert response.expires > datetime.now(UTC) + timedelta(minutes=30)
    storage = server.data_dir / "checkpoints" / tc.model_id / "external_weights" / "hf"
    for name, url in response.urls.items():
        got = httpx.get(url, timeout=30)  # no API key: the token authorises
        assert got.status_code == 200, got.text
        assert got.content == (storage / name).read_bytes()
    config = json.loads(httpx.get(response.urls["adapter_config.json"]).content)
    assert config["peft_type"] == "LORA" and config["r"] == 4

    # A tampered or expired token is refused; a deleted checkpoint is gone.
    url = response.urls["adapter_model.safetensors"]
    prefix, token = url.rsplit("/", 1)
    payload, sig = token.split(".")
    forged = downloads.sign(b"x" * 32, downloads.DownloadGrant(tc.model_id, "x/y", "z", 2**40))
    for bad in (f"{payload}.{sig[:-2]}AA", f"{payload[:-2]}AA.{sig}", forged, "nonsense"):
        assert httpx.get(f"{prefix}/{bad}").status_code == 403
    secret = (server.data_dir / downloads.SECRET_FILE).read_bytes()
    stale = downloads.DownloadGrant(
        tc.model_id, "external_weights/hf", "adapter_model.safetensors", int(time.time()) - 1
    )
    got = httpx.get(f"{prefix}/{downloads.sign(secret, stale)}")
    assert got.status_code == 403 and "expired" in got.text

    with pytest.raises(tinker.NotFoundError):
        rest_of(server, "tml-surf-export-other").get_external_weights_urls(path).result()
    rest.delete_checkpoint_from_tinker_path(path).result()
    assert httpx.get(url).status_code == 404


def run_cli(server, api_key: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TINKER_BASE_URL": server.base_url,
        "TINKER_API_KEY": api_key,
        "TINKER_TELEMETRY": "0",
    }
    launcher = [str(TINKER_CLI)] if TINKER_CLI.exists() else [sys.executable, "-m", "tinker.cli"]
    proc = subprocess.run(
        [*launcher, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_tinker_cli_checkpoint_list_and_download(clients, server, tmp_path) -> None:
    key = "tml-surf-cli"
    tc = trained_client(clients(key), server)
    state = tc.save_state("cli-state").result().path
    external = tc.save_weights_external("cli-hf").result().path

    table = run_cli(server, key, "checkpoint", "list", cwd=tmp_path).stdout
    assert "cli-state" in table and "cli-hf" in table
    as_json = json.loads(
        run_cli(server, key, "--format", "json", "checkpoint", "list", cwd=tmp_path).stdout
    )
    paths = {c["tinker_path"] for c in as_json["checkpoints"]}
    assert {state, external} <= paths

    # An external export downloads directly; a training checkpoint is exported first (a new
    # training run, save_weights_external, signed URLs, then the export is deleted).
    for path in (external, state):
        run_cli(server, key, "checkpoint", "download", path, "--output", "out", cwd=tmp_path)
        target = tmp_path / "out" / path.removeprefix("tinker://").replace("/", "_")
        weights = load_file(str(target / "adapter_model.safetensors"))
        assert weights and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
        config = json.loads((target / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["base_model_name_or_path"] == server.model
    # The temporary export of the training checkpoint was cleaned up.
    rest = rest_of(server, key)
    leftovers = [
        c.tinker_path
        for c in rest.list_user_checkpoints().result().checkpoints
        if c.checkpoint_id == "external_weights/download"
    ]
    assert leftovers == []


def test_copy_weights_into_a_new_run(clients, server) -> None:
    key = "tml-surf-copy"
    tc = trained_client(clients(key), server)
    state = tc.save_state("to-copy").result().path
    rest = rest_of(server, key)

    copied = rest.copy_weights(state, "proj-archive", ttl_seconds=7200).result()
    assert copied != state and copied.endswith("/weights/to-copy")
    new_run = copied.removeprefix("tinker://").split("/")[0]
    listed = rest.list_checkpoints(new_run).result().checkpoints
    assert [c.tinker_path for c in listed] == [copied]
    assert listed[0].expires_at is not None
    assert rest.get_training_run(new_run).result().base_model == server.model

    resumed = clients(key).create_training_client_from_state(copied).result()
    a = resumed.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    b = tc.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # The copy is independent: deleting the source leaves it loadable.
    rest.delete_checkpoint_from_tinker_path(state).result()
    clients(key).create_training_client_from_state(copied).result()

    other = rest_of(server, "tml-surf-copy-other")
    with pytest.raises(tinker.NotFoundError):
        other.copy_weights(copied, "proj-theirs").result()


def test_hosted_only_calls_say_not_available(server) -> None:
    admin = tinker.AdminClient(base_url=server.base_url, api_key="tml-surf-admin")
    calls = [
        lambda: admin.get_audit_log().result(),
        lambda: admin.get_billing_usage("2025-01-01", "2025-02-01").result(),
        lambda: admin.get_current_checkpoint_storage_usage().result(),
    ]
    for call in calls:
        with pytest.raises(tinker.NotFoundError) as err:
            call()
        assert "not available in self-hosted tinkerd" in str(err.value)
