"""The cookbook's RL recipes at their defaults: no `loss_fn` given, so they train with
cookbook 0.6.1's default loss, `stable_reinforce` (samples recorded with
`record_stability_info`, datums with provenance), in sync, async and streaming modes.

The short run is in `make test`; the rest are slow-marked (`make conformance`).
"""

from pathlib import Path

import pytest
from cookbook_helpers import Recipes, check_checkpoints, mean, metrics_by_step
from test_math_rl import REWARD, check_rl_metrics, rl_args

pytestmark = pytest.mark.embedded


def test_math_rl_at_defaults_short(recipes: Recipes, tmp_path: Path) -> None:
    """2 steps of 4 groups × 2 with the recipe's own loss (~40 s)."""
    log_path = tmp_path / "math_rl_default"
    args = rl_args("groups_per_batch=4", "group_size=2", "max_steps=2", "save_every=1")
    recipes.run("recipes.math_rl.train", log_path, args)
    check_rl_metrics(metrics_by_step(log_path), 2, 8)
    check_checkpoints(recipes.server, log_path, ["000001", "000002", "final"])
    assert "stable_reinforce" in (log_path / "config.json").read_text()


@pytest.mark.slow
def test_math_rl_at_defaults_reward_rises(recipes: Recipes, tmp_path: Path) -> None:
    """10 steps of 8 groups × 4 at lr 3e-4, as the importance_sampling run of
    test_math_rl.py, with the default loss: reward and format rise."""
    log_path = tmp_path / "math_rl_default_long"
    args = rl_args(
        "groups_per_batch=8", "group_size=4", "learning_rate=3e-4", "max_steps=10", "save_every=5"
    )
    recipes.run("recipes.math_rl.train", log_path, args)
    rows = check_rl_metrics(metrics_by_step(log_path), 10, 32)
    first, last = rows[:2], rows[-3:]
    assert mean([r[REWARD] for r in last]) > mean([r[REWARD] for r in first]), [
        r[REWARD] for r in rows
    ]


@pytest.mark.slow
def test_math_rl_async_at_defaults(recipes: Recipes, tmp_path: Path) -> None:
    """Async RL (`max_steps_off_policy=1`): sampling runs a step ahead of training, and
    `AsyncConfig.loss_fn` (stable_reinforce) trains on data up to one step stale."""
    log_path = tmp_path / "math_rl_async"
    args = rl_args(
        "groups_per_batch=4",
        "group_size=2",
        "max_steps=3",
        "save_every=0",
        "max_steps_off_policy=1",
        "learning_rate=1e-4",
    )
    recipes.run("recipes.math_rl.train", log_path, args)
    rows = [r for r in metrics_by_step(log_path) if REWARD in r]
    assert len(rows) == 3, rows
    check_checkpoints(recipes.server, log_path, None)


@pytest.mark.slow
def test_math_rl_streaming_minibatches_at_defaults(recipes: Recipes, tmp_path: Path) -> None:
    """Streaming minibatches: each of 2 minibatches of a step is trained as soon as its
    groups are sampled (2 forward_backward calls, 1 optim_step per step)."""
    log_path = tmp_path / "math_rl_stream"
    args = rl_args(
        "groups_per_batch=4",
        "group_size=2",
        "max_steps=2",
        "save_every=0",
        "stream_minibatch_config.groups_per_batch=4",
        "stream_minibatch_config.num_minibatches=2",
    )
    recipes.run("recipes.math_rl.train", log_path, args)
    rows = [r for r in metrics_by_step(log_path) if REWARD in r]
    assert len(rows) == 2, rows
    check_checkpoints(recipes.server, log_path, None)
