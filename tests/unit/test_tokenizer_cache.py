"""`tinkerd tokenizer-cache`: a served model's tokenizer seeded into the HF hub cache loads
offline with a plain `AutoTokenizer.from_pretrained(name)` (no cookbook helpers), in a fresh
process whose only hints are HF_HOME and HF_HUB_OFFLINE=1."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import try_to_load_from_cache
from transformers import AutoTokenizer
from typer.testing import CliRunner

from tinkerd.cli import app
from tinkerd.constants import EMBEDDED_MODEL
from tinkerd.model.loading import convert_embedded_model
from tinkerd.model.tokenizer_cache import revision_of, tokenizer_files, write_tokenizer_cache

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo, wörld! 1 + 1 = ?"},
]
TEXTS = ["Hello world!", "  spaced\tout\nlines ", "ünïcödé 🙂 <|im_end|> tail"]

# Runs in a child process: load `name` offline from the seeded cache and report what it does.
LOAD = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoTokenizer
    name, messages, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(name)
    print(json.dumps({
        "encodings": [tok(t).input_ids for t in texts],
        "chat_template": tok.chat_template,
        "chat": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        "chat_ids": list(tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]),
        "eos": tok.eos_token, "pad": tok.pad_token, "vocab": len(tok),
    }))
    if len(sys.argv) > 4:  # what the SDK's SamplingClient.get_tokenizer() does with the name
        from tinker.lib.public_interfaces.sampling_client import _load_tokenizer_from_model_info
        print(json.dumps(_load_tokenizer_from_model_info(name)(sys.argv[4]).input_ids))
    """
)


def offline_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TINKERD_"))}
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_python(code: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def load_offline(name: str, env: dict[str, str], *sdk_text: str) -> list:
    out = run_python(LOAD, name, json.dumps(MESSAGES), json.dumps(TEXTS), *sdk_text, env=env)
    return [json.loads(line) for line in out.strip().splitlines()[-1 - len(sdk_text) :]]


def expected_from(source: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(source)
    return {
        "encodings": [tok(t).input_ids for t in TEXTS],
        "chat_template": tok.chat_template,
        "chat": tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
        "chat_ids": list(
            tok.apply_chat_template(
                MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
        ),
        "eos": tok.eos_token,
        "pad": tok.pad_token,
        "vocab": len(tok),
    }


@pytest.fixture(scope="module")
def tiny_chat_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer and config, with a chat template added."""
    target = tmp_path_factory.mktemp("tiny-chat")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(target)
    (target / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    return target


def test_tiny_tokenizer_loads_offline_by_hub_name(tiny_chat_dir: Path, tmp_path: Path) -> None:
    name = "tinkerd-test/tiny-chat"
    hf_home = tmp_path / "hf"
    env = offline_env(hf_home)
    # Written in a child process too, so the cache location comes from HF_HOME the way
    # huggingface_hub resolves it (HF_HUB_CACHE unset -> HF_HOME/hub).
    write = (
        "import sys; from tinkerd.model.tokenizer_cache import write_tokenizer_cache as w\n"
        "a, b = w(sys.argv[1], sys.argv[2]), w(sys.argv[1], sys.argv[2])\n"
        "print(a.snapshot_dir, a.changed, b.changed, b.revision == a.revision)"
    )
    snapshot, first, second, same = run_python(write, name, str(tiny_chat_dir), env=env).split()
    repo = hf_home / "hub" / "models--tinkerd-test--tiny-chat"
    assert (first, second, same) == ("True", "False", "True")
    revision = (repo / "refs" / "main").read_text()
    assert Path(snapshot) == repo / "snapshots" / revision
    assert len(revision) == 40 and int(revision, 16) >= 0
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {
        p.name for p in Path(snapshot).iterdir()
    }

    [got] = load_offline(name, env)
    want = expected_from(tiny_chat_dir)
    assert got == want
    assert got["chat_template"] == TEMPLATE
    assert got["chat"].endswith("<|im_start|>assistant\n")

    # The files came from the seeded cache: an empty cache has nothing for this name.
    assert try_to_load_from_cache(name, "tokenizer.json", cache_dir=tmp_path / "empty") is None
    assert try_to_load_from_cache(name, "tokenizer.json", cache_dir=repo.parent) == str(
        Path(snapshot) / "tokenizer.json"
    )


def test_revision_is_content_addressed(tiny_chat_dir: Path, tmp_path: Path) -> None:
    files = tokenizer_files(tiny_chat_dir)
    a = write_tokenizer_cache("org/one", tiny_chat_dir, tmp_path)
    b = write_tokenizer_cache("org/two", tiny_chat_dir, tmp_path)
    assert a.revision == b.revision == revision_of(files)
    assert "is_local" not in json.loads(files["tokenizer_config.json"])

    # A changed tokenizer gets a new snapshot, and refs/main moves to it.
    other = tmp_path / "other"
    other.mkdir()
    for name, content in files.items():
        (other / name).write_bytes(content)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    c = write_tokenizer_cache("org/one", other, tmp_path)
    assert c.changed and c.revision != a.revision
    assert (tmp_path / "models--org--one" / "refs" / "main").read_text() == c.revision

    # A damaged snapshot is rewritten whole.
    (c.snapshot_dir / "tokenizer.json").write_text("{}")
    d = write_tokenizer_cache("org/one", other, tmp_path)
    assert d.changed and (d.snapshot_dir / "tokenizer.json").read_bytes() == files["tokenizer.json"]

    with pytest.raises(FileNotFoundError):
        write_tokenizer_cache("org/none", tmp_path / "nothing-here", tmp_path)


@pytest.mark.embedded
def test_cli_seeds_embedded_model_for_offline_clients(data_dir: Path, tmp_path: Path) -> None:
    source = convert_embedded_model(data_dir)
    hf_home = tmp_path / "hf"
    env = offline_env(hf_home)
    tinkerd = Path(sys.executable).parent / "tinkerd"
    cmd = [str(tinkerd)] if tinkerd.exists() else [sys.executable, "-m", "tinkerd.cli"]
    args = ["tokenizer-cache", "--data-dir", str(data_dir)]  # default: every served model
    repo = hf_home.resolve() / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{EMBEDDED_MODEL}: wrote {repo}/snapshots/" in done.stdout
    # Again (in process, naming the same cache): nothing to do.
    again = CliRunner().invoke(
        app, [*args, "--model", EMBEDDED_MODEL, "--cache-dir", str(repo.parent)]
    )
    assert again.exit_code == 0, again.output
    assert f"{EMBEDDED_MODEL}: up to date {repo}/snapshots/" in again.output

    got, sdk_ids = load_offline(EMBEDDED_MODEL, env, TEXTS[0])
    want = expected_from(source)
    assert got == want
    assert got["chat_template"] and "<|im_start|>" in got["chat_template"]
    assert got["eos"] == "<|im_end|>"
    assert sdk_ids == want["encodings"][0]
