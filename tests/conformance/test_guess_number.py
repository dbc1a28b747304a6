"""`tinker_cookbook.recipes.multiplayer_rl.guess_number.train` (multi-turn RL).

The player guesses a number in up to 10 turns (`MAX_TURNS`, not configurable); each turn's reward
is 1 (correct), 0 (too high/low) or -1 (unparseable). Every turn is its own datum: the history is
rendered with a `player` role but the next prompt asks for `assistant`, so turns do not extend one
another, and one step trains on turns × episodes datums of growing length.
That batch once made the server run out of memory; training now runs in memory-bounded
micro-batches. The recipe has no `base_url` field; it reaches the server through TINKER_BASE_URL.
"""

import math
from pathlib import Path

import pytest
from cookbook_helpers import Recipes, check_checkpoints, metrics_by_step

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

REWARD = "env/all/reward/total"
MAX_TURNS = 10
BATCH_SIZE = 1
GROUP_SIZE = 2


def test_guess_number_multi_turn_step(recipes: Recipes, tmp_path: Path) -> None:
    """One step of 1 group × 2 episodes, 8 tokens a turn: ~20 datums, ~5.5k tokens, several
    micro-batches (~75 s on 2 idle cores; the untrained model never keeps the format, so
    episodes run all 10 turns)."""
    log_path = tmp_path / "guess_number"
    args = [
        f"batch_size={BATCH_SIZE}",
        f"group_size={GROUP_SIZE}",
        "max_tokens=8",
        "max_steps=1",
        "eval_every=0",
        "save_every=0",
        "behavior_if_log_dir_exists=delete",
    ]
    recipes.run("recipes.multiplayer_rl.guess_number.train", log_path, args, base_url_arg=False)
    rows = [r for r in metrics_by_step(log_path) if REWARD in r]
    assert [r["step"] for r in rows] == [0], rows
    r = rows[0]
    episodes = BATCH_SIZE * GROUP_SIZE
    assert r["env/all/total_episodes"] == episodes, r
    assert 1 < r["env/all/turns_per_episode"] <= MAX_TURNS, r
    assert r["env/all/total_turns"] == episodes * r["env/all/turns_per_episode"], r
    assert r["env/all/total_ac_tokens"] > 0, r
    # An episode's return sums its turns: at worst -1 for each of 10 turns, at best 1.
    assert math.isfinite(r[REWARD]) and -MAX_TURNS <= r[REWARD] <= 1.0, r
    # The sampler snapshot and the trainer score the sampled tokens alike, across all the
    # micro-batches the multi-turn datums are split into.
    assert math.isfinite(r["optim/kl_sample_train_v1"]), r
    assert abs(r["optim/kl_sample_train_v1"]) < 0.01, r
    check_checkpoints(recipes.server, log_path, ["final"])
