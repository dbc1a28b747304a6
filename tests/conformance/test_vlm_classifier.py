"""`tinker_cookbook.recipes.vlm_classifier.train`, unmodified, against `tinkerd serve` of a tiny
random-init Qwen3-VL-MoE served under a real name.

The recipe is run as a user runs it (`python -m ... dataset=caltech101 ...`), offline:

* The model is built in code (tests/unit/vision_models.py, `chat=True`: the byte-level
  tokenizer plus Qwen's `<|vision_start|>`-style special tokens, so the cookbook's
  `qwen3_vl_instruct` renderer finds each as one token) and served as
  `Qwen/Qwen3-VL-30B-A3B-Instruct` (`--model NAME=PATH`), the name the cookbook knows.
* Its tokenizer and image processor load by that name from an HF cache seeded by
  `tinkerd tokenizer-cache`, plus the model's `preprocessor_config.json` (which tokenizer-cache
  does not copy), with HF_HUB_OFFLINE=1.
* The recipe's dataset builders hard-code hub ids (`caltech101` is
  `datasets.load_dataset("dpdl-benchmark/caltech101")`); `load_dataset` takes a local directory
  of that relative path first, so the recipe runs in a directory holding
  `dpdl-benchmark/caltech101/{train,test}.parquet`: coloured squares, two classes, with the
  `image` / `label` (ClassLabel) columns the recipe reads.

Every training datum carries an `ImageChunk` (jpeg, `expected_tokens` from the processor,
checked by the server); the recipe's sampling evaluator and its test-NLL evaluator send image
prompts to sampling clients of the run's weights.
"""

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tinker
from cookbook_helpers import (
    API_KEY,
    RECIPE_TIMEOUT_S,
    TINKERD,
    Recipes,
    mean,
    metrics_by_step,
)
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from e2e_helpers import Server, run_server
from PIL import Image
from unit.vision_models import build_qwen_vl

NAME = "Qwen/Qwen3-VL-30B-A3B-Instruct"
RENDERER = "qwen3_vl_instruct"  # the cookbook's renderer for NAME (model_info)
CLASSES = ["red_square", "blue_square"]
COLOURS = [(220, 30, 30), (30, 30, 220)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_vl(tmp_path_factory.mktemp("qwen3_vl_moe"), "qwen3_vl_moe", chat=True)


@pytest.fixture(scope="module")
def vl_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(model_dir, tmp_path_factory.mktemp("vl-server"), served_as=NAME) as srv:
        yield srv


@pytest.fixture(scope="module")
def hub_cache(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tokenizer (tinkerd tokenizer-cache) and image processor config under NAME."""
    root = tmp_path_factory.mktemp("hf")
    hub = root / "hub"
    launcher = [str(TINKERD)] if TINKERD.exists() else [sys.executable, "-m", "tinkerd.cli"]
    cmd = [*launcher, "tokenizer-cache", "--model", f"{NAME}={model_dir}"]
    cmd += ["--data-dir", str(root / "data"), "--cache-dir", str(hub)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (snapshot,) = (hub / f"models--{NAME.replace('/', '--')}" / "snapshots").iterdir()
    shutil.copy(model_dir / "preprocessor_config.json", snapshot)
    return hub


def square(label: int, seed: int) -> Image.Image:
    """A coloured square on a noisy background, at a random place (56x56: 4 image tokens)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (56, 56, 3), dtype=np.uint8)
    x, y = rng.integers(0, 24, 2)
    pixels[y : y + 32, x : x + 32] = COLOURS[label]
    return Image.fromarray(pixels)


def write_dataset(root: Path, n_train: int, n_test: int) -> None:
    """`dpdl-benchmark/caltech101` under `root`, as the recipe reads it: image + ClassLabel."""
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASSES)})
    where = root / "dpdl-benchmark" / "caltech101"
    where.mkdir(parents=True)
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        labels = [i % len(CLASSES) for i in range(n)]
        images = [square(label, offset + i) for i, label in enumerate(labels)]
        data = Dataset.from_dict({"image": images, "label": labels}, features=features)
        data.to_parquet(str(where / f"{split}.parquet"))


def run_recipe(server: Server, hub: Path, workdir: Path, args: list[str]) -> Path:
    """Run the recipe in `workdir` (where its dataset is); the run's log directory."""
    env = {**Recipes(server, hub).env, "TINKER_COOKBOOK_RUNS_DIR": str(workdir)}
    cmd = [sys.executable, "-m", "tinker_cookbook.recipes.vlm_classifier.train"]
    cmd += [f"experiment_dir={workdir / 'runs'}", "dataset=caltech101", f"model_name={NAME}"]
    cmd += [f"renderer_name={RENDERER}", f"base_url={server.base_url}", *args]
    out_path = workdir / "recipe.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        try:
            code: int | str = proc.wait(RECIPE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = f"timeout after {RECIPE_TIMEOUT_S}s"
    output = out_path.read_text(errors="replace")
    assert code == 0 and "Traceback" not in output, (
        f"{' '.join(cmd)}\nexited with {code}:\n{output[-6000:]}\n"
        f"--- server log tail ---\n{server.log()[-3000:]}"
    )
    (log_path,) = (workdir / "runs").iterdir()
    return log_path


def test_vlm_classifier_trains_and_samples_with_images(
    vl_server: Server, hub_cache: Path, tmp_path: Path
) -> None:
    """CI-sized: 8 training images, batch 4, 3 epochs (6 steps); the sampling and test-NLL
    evaluators run on 4 test images before steps 0 and 3."""
    write_dataset(tmp_path, n_train=8, n_test=4)
    log_path = run_recipe(
        vl_server,
        hub_cache,
        tmp_path,
        [
            "batch_size=4",
            "num_epochs=3",
            "learning_rate=1e-2",
            "lr_schedule=constant",
            "lora_rank=8",
            "eval_every=3",
            "save_every=0",
            "n_eval=4",
            "max_tokens=8",
            "behavior_if_log_dir_exists=delete",
        ],
    )
    rows = metrics_by_step(log_path)
    assert [r["step"] for r in rows] == list(range(6))
    assert all(r["num_sequences"] == 4 and r["num_loss_tokens"] > 0 for r in rows)
    nll = [r["train_mean_nll"] for r in rows]
    epochs = [mean(nll[0:2]), mean(nll[2:4]), mean(nll[4:6])]
    assert epochs[1] < epochs[0] and epochs[2] < 0.8 * epochs[0], nll
    # The evaluators ran: the sampling evaluator's image prompts were answered (its accuracy
    # parses the sampled text), and the test NLL of image data (prompt logprobs) fell.
    evals = [r for r in rows if "accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3], rows
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    assert all(np.isfinite(r["test/nll"]) for r in evals), evals
    assert evals[1]["test/nll"] < evals[0]["test/nll"], evals
    rest = tinker.RestClient(base_url=vl_server.base_url, api_key=API_KEY)
    runs = rest.list_training_runs().result().training_runs
    assert [r.base_model for r in runs] == [NAME]
