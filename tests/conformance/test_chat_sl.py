"""`tinker_cookbook.recipes.chat_sl.train` (supervised learning) on the bundled conversations."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
from cookbook_helpers import (
    EXAMPLE_DATA,
    RECIPE_TIMEOUT_S,
    Recipes,
    check_checkpoints,
    mean,
    metrics_by_step,
    read_jsonl,
)

pytestmark = pytest.mark.embedded

CONVERSATIONS = EXAMPLE_DATA / "conversations.jsonl"


def sl_args(dataset: Path, *extra: str) -> list[str]:
    return [
        f"dataset={dataset}",
        "lora_rank=8",
        "learning_rate=3e-4",
        "lr_schedule=constant",
        "max_length=512",
        "eval_every=0",
        "behavior_if_log_dir_exists=delete",
        *extra,
    ]


def epoch_nll(rows: list[dict]) -> dict[int, float]:
    epochs = sorted({r["epoch"] for r in rows})
    return {e: mean([r["train_mean_nll"] for r in rows if r["epoch"] == e]) for e in epochs}


def test_chat_sl_loss_falls_and_checkpoints(recipes: Recipes, tmp_path: Path) -> None:
    """CI-sized (~45 s): 3 epochs over the first 32 bundled conversations, batch 8 (12 steps).

    Each epoch sees the same conversations, so the per-epoch mean NLL is a like-for-like
    comparison; it must fall clearly. Saves every 4 steps plus the final save."""
    subset = tmp_path / "conversations32.jsonl"
    subset.write_text("".join(CONVERSATIONS.read_text().splitlines(keepends=True)[:32]))
    log_path = tmp_path / "chat_sl"
    recipes.run(
        "recipes.chat_sl.train",
        log_path,
        sl_args(subset, "batch_size=8", "num_epochs=3", "save_every=4"),
    )

    rows = metrics_by_step(log_path)
    assert [r["step"] for r in rows] == list(range(12))
    assert all(r["num_sequences"] == 8 and r["num_loss_tokens"] > 0 for r in rows)
    nll = epoch_nll(rows)
    assert sorted(nll) == [0, 1, 2]
    assert nll[1] < nll[0] and nll[2] < 0.8 * nll[0], nll

    check_checkpoints(recipes.server, log_path, ["000004", "000008", "final"])


@pytest.mark.slow
def test_chat_sl_full_file_and_resume(recipes: Recipes, tmp_path: Path) -> None:
    """All 128 conversations, batch 32, stopped by max_steps=3; then a rerun with
    behavior_if_log_dir_exists=resume, which reads the renderer back from the run's
    user_metadata (get_training_run_by_tinker_path) and restores the last state with its
    optimizer (create_training_client_from_state_with_optimizer).

    The cookbook records a max_steps stop as a finished run ("final" checkpoint), so the
    resumed run loads that state and then has nothing left to train."""
    log_path = tmp_path / "chat_sl_full"
    common = sl_args(CONVERSATIONS, "batch_size=32", "num_epochs=2", "save_every=2")
    recipes.run("recipes.chat_sl.train", log_path, [*common, "max_steps=3"])
    rows = metrics_by_step(log_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train_mean_nll"] < rows[0]["train_mean_nll"], rows
    check_checkpoints(recipes.server, log_path, ["000002", "final"])

    resumed = [a for a in common if not a.startswith("behavior_if")]
    out = recipes.run(
        "recipes.chat_sl.train", log_path, [*resumed, "behavior_if_log_dir_exists=resume"]
    )
    final = read_jsonl(log_path / "checkpoints.jsonl")[-1]["state_path"]
    assert f"Resumed training from {final}" in out, out[-3000:]
    assert "Training completed successfully" in out, out[-3000:]


def wait_for_checkpoint(proc: subprocess.Popen[bytes], log_path: Path, out: Path) -> None:
    """Block until the running recipe has recorded a whole checkpoint line (fail if it exits
    first)."""
    checkpoints = log_path / "checkpoints.jsonl"
    deadline = time.monotonic() + RECIPE_TIMEOUT_S
    while not (checkpoints.exists() and checkpoints.read_text().endswith("\n")):
        assert proc.poll() is None, out.read_text(errors="replace")[-6000:]
        assert time.monotonic() < deadline, "no checkpoint within the recipe timeout"
        time.sleep(0.1)


def test_chat_sl_resumes_after_kill(recipes: Recipes, tmp_path: Path) -> None:
    """The run is SIGKILLed as soon as its first periodic checkpoint is recorded, then rerun
    with behavior_if_log_dir_exists=resume: it restores that state with its optimizer, keeps
    the metrics of the steps before it, trains the remaining steps and saves "final".

    32 conversations, batch 8, 2 epochs (8 steps), save_every=2."""
    subset = tmp_path / "conversations32.jsonl"
    subset.write_text("".join(CONVERSATIONS.read_text().splitlines(keepends=True)[:32]))
    log_path = tmp_path / "chat_sl_killed"
    common = sl_args(subset, "batch_size=8", "num_epochs=2", "save_every=2")
    proc, out = recipes.start("recipes.chat_sl.train", log_path, common)
    try:
        wait_for_checkpoint(proc, log_path, out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, out.read_text(errors="replace")[-6000:]

    saved = read_jsonl(log_path / "checkpoints.jsonl")
    last = saved[-1]
    assert last["name"] != "final", saved
    batches_per_epoch = 4
    resume_step = last["epoch"] * batches_per_epoch + last["batch"]
    assert 0 < resume_step < 8, last
    raw = read_jsonl(log_path / "metrics.jsonl")
    before = [r for r in raw if r["step"] < resume_step]
    assert {r["step"] for r in before} == set(range(resume_step)), raw

    resumed = [a for a in common if not a.startswith("behavior_if")]
    output = recipes.run(
        "recipes.chat_sl.train", log_path, [*resumed, "behavior_if_log_dir_exists=resume"]
    )
    assert f"Resumed training from {last['state_path']}" in output, output[-3000:]
    assert "Training completed successfully" in output, output[-3000:]

    # The steps before the checkpoint were not trained again: their rows are untouched and
    # not duplicated; every later step was trained once, by the resumed run.
    raw = read_jsonl(log_path / "metrics.jsonl")
    assert [r for r in raw if r["step"] < resume_step] == before
    rows = metrics_by_step(log_path)
    assert [r["step"] for r in rows] == list(range(8))
    assert all(r["num_sequences"] == 8 for r in rows[resume_step:]), rows
    nll = epoch_nll(rows)
    assert nll[1] < nll[0], nll

    # The resumed run saves again from its first step on (a new training run, so new paths).
    later = [f"{s:06d}" for s in range(resume_step, 8) if s % 2 == 0]
    check_checkpoints(recipes.server, log_path, [r["name"] for r in saved] + later + ["final"])
