"""Serving models under their real names (`--model NAME=PATH`), and models that ship their
own code (`--trust-remote-code NAME`, off by default)."""

import json
import subprocess
from pathlib import Path

import pytest
import tinker
from e2e_helpers import TINKERD, adam, free_port, run_server, sft_datum
from transformers import AutoTokenizer

from tinkerd.model.tiny import build_tiny_model

NAME = "acme/tiny-llama-8b"


def test_local_directory_served_under_a_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    with run_server(tiny_model_dir, tmp_path, served_as=NAME) as srv:
        sc = srv.client()
        rest = tinker.RestClient(base_url=srv.base_url, api_key="tml-e2e")
        caps = rest.get_server_capabilities().result()
        assert [m.model_name for m in caps.supported_models] == [NAME]
        tc = sc.create_lora_training_client(base_model=NAME, rank=4).result()
        info = tc.get_info()
        assert info.model_data.model_name == NAME
        assert info.model_data.tokenizer_id == NAME  # clients load the tokenizer by name
        tc.forward_backward([sft_datum([1, 2, 3, 4, 5])], "cross_entropy").result(timeout=60)
        tc.optim_step(adam(1e-3)).result(timeout=60)
        path = tc.save_weights_for_sampler("named").result(timeout=60).path
        run = rest.get_training_run(tc.model_id).result()
        assert run.base_model == NAME
        sampler = sc.create_sampling_client(model_path=path).result()
        assert sampler.get_base_model() == NAME

    # `tinkerd tokenizer-cache` publishes the directory's tokenizer under the name.
    cache = tmp_path / "hub"
    out = subprocess.run(
        [
            *(str(TINKERD), "tokenizer-cache", "--model", f"{NAME}={tiny_model_dir}"),
            *("--data-dir", str(tmp_path / "data"), "--cache-dir", str(cache)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert NAME in out.stdout
    tok = AutoTokenizer.from_pretrained(NAME, cache_dir=cache, local_files_only=True)
    assert (
        tok("hello").input_ids == AutoTokenizer.from_pretrained(tiny_model_dir)("hello").input_ids
    )


def serve_and_fail(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(TINKERD), "serve", "--port", str(free_port()), "--data-dir", str(data_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("=/tmp", "expected NAME=PATH"), ("acme/x=/no/such/dir", "is not a directory")],
)
def test_bad_model_specs_are_refused_at_once(spec: str, needle: str, tmp_path: Path) -> None:
    done = serve_and_fail(["--model", spec], tmp_path)
    assert done.returncode == 2 and needle in done.stderr, done.stderr


CUSTOM = "acme/custom-code"


def custom_code_model(path: Path) -> Path:
    """The tiny Llama as a model that ships its own code (config `auto_map`), as Kimi-K2 does:
    a config and a model class of its own, subclasses of Llama's."""
    build_tiny_model(path)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="acme_llama",
        architectures=["AcmeForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_acme.AcmeConfig",
            "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM",
        },
    )
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_acme.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class AcmeConfig(LlamaConfig):\n    model_type = 'acme_llama'\n"
    )
    (path / "modeling_acme.py").write_text(
        "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_acme import AcmeConfig\n\n\n"
        "class AcmeForCausalLM(LlamaForCausalLM):\n    config_class = AcmeConfig\n"
    )
    return path


def test_remote_code_runs_only_when_allowed(tmp_path: Path) -> None:
    model = custom_code_model(tmp_path / "custom")
    refused = serve_and_fail(["--model", f"{CUSTOM}={model}"], tmp_path / "refused")
    assert refused.returncode == 2
    assert f"--trust-remote-code {CUSTOM}" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused" / "runs").exists()  # refused before loading anything
    (tmp_path / "allowed").mkdir()
    env = {"TINKERD_TRUST_REMOTE_CODE": json.dumps([CUSTOM]), "HF_HOME": str(tmp_path / "hf")}
    with run_server(model, tmp_path / "allowed", served_as=CUSTOM, **env) as srv:
        tc = srv.client().create_lora_training_client(base_model=CUSTOM, rank=4).result()
        out = tc.forward_backward([sft_datum([5, 6, 7, 8])], "cross_entropy").result(timeout=60)
        assert out.metrics["loss:sum"] > 0
        assert "AcmeForCausalLM" in tc.get_info().model_data.arch


def test_load_base_model_names_the_flag(tmp_path: Path) -> None:
    """Hub models are only checked when they load: the loader's own refusal."""
    from tinkerd.model.loading import RemoteCodeRequired, load_base_model

    model = custom_code_model(tmp_path / "custom")
    with pytest.raises(RemoteCodeRequired, match=f"--trust-remote-code {CUSTOM}"):
        load_base_model(str(model), data_dir=tmp_path, served_name=CUSTOM)
