"""`tinker_cookbook.recipes.preference.shorter.train` (pairwise-preference RL).

Each group's completions are compared pairwise by a length-based preference model (shorter
wins), and `compute_post_kl=True` is hard-coded, so every step also asks the server for
prompt logprobs (sample with include_prompt_logprobs) on the pre- and post-update samplers.
The recipe has no `base_url` field; it reaches the server through TINKER_BASE_URL. Its loss is
rl.train's default, importance_sampling.
"""

import math
from pathlib import Path

import pytest
from cookbook_helpers import Recipes, check_checkpoints, metrics_by_step

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

REWARD = "env/all/reward/total"


def test_preference_shorter_completes(recipes: Recipes, tmp_path: Path) -> None:
    """2 steps of 2 groups × 4 (~15 s). Checks the per-step reward metrics (pairwise
    win-minus-loss), the post-update KL that needs prompt logprobs, sampler/trainer logprob
    agreement, and the final checkpoint."""
    log_path = tmp_path / "shorter"
    args = [
        "batch_size=2",
        "group_size=4",
        "max_tokens=16",
        "learning_rate=1e-4",
        "eval_every=0",
        "max_steps=2",
        "behavior_if_log_dir_exists=delete",
    ]
    recipes.run("recipes.preference.shorter.train", log_path, args, base_url_arg=False)
    rows = [r for r in metrics_by_step(log_path) if REWARD in r]
    assert [r["step"] for r in rows] == [0, 1], rows
    for r in rows:
        assert r["env/all/total_episodes"] == 8, r
        assert r["env/all/total_ac_tokens"] > 0, r
        for key in (REWARD, "env/all/win_minus_loss", "kl_pre_post_v1", "kl_pre_post_v2"):
            assert math.isfinite(r[key]), (key, r)
        assert -1.0 <= r[REWARD] <= 1.0, r
        # The sampler snapshot and the trainer score the sampled tokens alike.
        assert abs(r["optim/kl_sample_train_v1"]) < 0.01, r
    check_checkpoints(recipes.server, log_path, None)
