"""DPO through `tinker_cookbook.preference.train_dpo` on a small JSONL of comparisons.

The DPO CLI (`recipes.preference.dpo.train`) only knows hub datasets, so a tiny driver builds
`train_dpo.Config` with `DPODatasetBuilderFromComparisons(ComparisonBuilderFromJsonl(...))` and
calls `train_dpo.main`, unmodified. Per step: reference logprobs via `compute_logprobs` on the
step-0 snapshot (save_weights_and_get_sampling_client, which must stay frozen while training
goes on), then `forward_backward_custom` (a forward pass, then forward_backward with
weights = -dLoss/dlogprob, which are negative for the rejected completions), then optim_step.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cookbook_helpers import (
    MODEL,
    RECIPE_TIMEOUT_S,
    RENDERER,
    Recipes,
    check_checkpoints,
    mean,
    metrics_by_step,
)

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

# (prompt, chosen, rejected): short, terse answers preferred over rambling refusals.
PAIRS = [
    ("What is 2+2?", "4", "I am not sure, maybe five or something."),
    ("What colour is the sky?", "Blue.", "I cannot answer questions about colours."),
    ("Name a fruit.", "Apple.", "Fruits are a complicated topic I would rather avoid."),
    ("What is the capital of France?", "Paris.", "I do not know any capitals at all."),
    ("How many legs does a cat have?", "Four.", "Cats are mysterious; nobody can say."),
    ("What is 3 times 3?", "9", "Multiplication is beyond what I can do today."),
    ("Say hello.", "Hello!", "I would prefer not to greet anyone right now."),
    ("What day follows Monday?", "Tuesday.", "Days of the week are unknowable to me."),
]

DRIVER = """
import sys

from tinker_cookbook.preference import train_dpo
from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

log_path, train_path, base_url, model, renderer = sys.argv[1:6]
builder = DPODatasetBuilderFromComparisons(
    common_config=ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model, renderer_name=renderer, max_length=256, batch_size=4
    ),
    comparison_builder=ComparisonBuilderFromJsonl(train_path=train_path),
)
train_dpo.main(
    train_dpo.Config(
        log_path=log_path,
        model_name=model,
        recipe_name="conformance_dpo",
        renderer_name=renderer,
        dataset_builder=builder,
        learning_rate=3e-4,
        lr_schedule="constant",
        num_epochs=4,
        dpo_beta=0.1,
        lora_rank=8,
        base_url=base_url,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
    )
)
"""


def write_comparisons(path: Path) -> None:
    with open(path, "w") as f:
        for i, (prompt, chosen, rejected) in enumerate(PAIRS):
            # Alternate which side is preferred, so the label is actually read.
            a, b, label = (chosen, rejected, "A") if i % 2 == 0 else (rejected, chosen, "B")
            row = {
                "comparison": {
                    "prompt_conversation": [{"role": "user", "content": prompt}],
                    "completion_A": [{"role": "assistant", "content": a}],
                    "completion_B": [{"role": "assistant", "content": b}],
                },
                "label": label,
            }
            f.write(json.dumps(row) + "\n")


def test_dpo_from_jsonl_loss_falls(recipes: Recipes, tmp_path: Path) -> None:
    """8 comparisons, batch 4, 4 epochs (8 steps). At step 0 the policy equals the reference,
    so the DPO loss is log 2 and the margin 0; training must lower the loss and grow the
    chosen-minus-rejected margin (which needs the reference snapshot to stay frozen)."""
    train_path = tmp_path / "comparisons.jsonl"
    write_comparisons(train_path)
    driver = tmp_path / "dpo_driver.py"
    driver.write_text(DRIVER)
    log_path = tmp_path / "dpo"
    out_path = tmp_path / "dpo.out"
    cmd = [
        sys.executable,
        str(driver),
        str(log_path),
        str(train_path),
        recipes.server.base_url,
        MODEL,
        RENDERER,
    ]
    with open(out_path, "wb") as out:
        proc = subprocess.run(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**recipes.env, "TINKER_COOKBOOK_RUNS_DIR": str(tmp_path)},
            cwd=tmp_path,
            timeout=RECIPE_TIMEOUT_S,
        )
    output = out_path.read_text(errors="replace")
    assert proc.returncode == 0, (
        f"{output[-6000:]}\n--- server log tail ---\n{recipes.server.log()[-3000:]}"
    )
    assert "Traceback" not in output, output[-6000:]

    rows = [r for r in metrics_by_step(log_path) if "dpo_loss" in r]
    assert [r["step"] for r in rows] == list(range(8)), rows
    assert all(r["num_pairs"] == 4 for r in rows), rows
    losses = [r["dpo_loss"] for r in rows]
    margins = [r["margin"] for r in rows]
    # Step 0: policy == reference snapshot, so loss = log 2 and margin = 0.
    assert abs(losses[0] - 0.6931) < 0.02, losses
    assert abs(margins[0]) < 0.1, margins
    assert mean(losses[-2:]) < 0.9 * losses[0], losses
    assert mean(margins[-2:]) > 0.1, margins
    assert rows[-1]["accuracy"] >= 0.75, [r["accuracy"] for r in rows]
    check_checkpoints(recipes.server, log_path, None)
