"""`tinker_cookbook.recipes.rubric.train` (RL graded by a second, base-model sampler).

Each rollout's response goes to a grader LLM: the dataset builder opens its own ServiceClient
(base_url from TINKER_BASE_URL; the CLI does not pass its `base_url` on) and samples the grader
with `create_sampling_client(base_model=grader_llm_name)`, here the same SmolLM2 with no LoRA.
The reward is the score the grader writes (extracted with each rubric's regex) minus 0.1 when
the policy did not stop at `<|im_end|>`.

Offline: the recipe reads prompts and rubrics from local JSONL files (`train_jsonl_path`,
`test_jsonl_path`); tests/conformance/data/rubric_*.jsonl are addition prompts in the format
`recipes.rubric.generate_data` writes. Their extraction regex only accepts scores in [0, 1], so
the reward is bounded (the default `<score>(.*?)</score>` takes any float the grader writes).

The grader's `max_tokens=2048` and temperature 1 are hard-coded, and the 135M grader seldom
follows the format, so one grader call can run to 2048 tokens: a step can take minutes on CPU.
"""

import html
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tinker
from cookbook_helpers import API_KEY, MODEL, Recipes, check_checkpoints, metrics_by_step, read_jsonl

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

DATA = Path(__file__).resolve().parent / "data"
REWARD = "env/all/reward/total"
FORMAT_PENALTY = 0.1
GROUP_SIZE = 2


def session_samplers(rest: tinker.RestClient) -> dict[str, list[tinker.types.GetSamplerResponse]]:
    """Every session of this API key, with its samplers."""
    sessions = rest.list_sessions(limit=1000).result().sessions
    return {
        s: [rest.get_sampler(i).result() for i in rest.get_session(s).result().sampler_ids]
        for s in sessions
    }


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every element of a logtree JSON tree (train_logtree.json), depth first."""
    if isinstance(node, dict):
        yield node
        for child in node.get("children", []):
            yield from walk(child)


def text(node: Any) -> str:
    """The text under a logtree element (stored HTML-escaped)."""
    if isinstance(node, str):
        return html.unescape(node)
    return "".join(text(c) for c in node.get("children", []))


def grades(logtree: dict[str, Any]) -> list[tuple[float, str]]:
    """(score, grader output) for each "Rubric N: score=X" section the env logged."""
    found = []
    for section in walk(logtree["root"]):
        children = section.get("children", [])
        if section.get("tag") != "section" or not children:
            continue
        header = re.fullmatch(r"Rubric \d+: score=(\S+)", text(children[0]))
        if header is None:
            continue
        outputs = [
            text(d["children"][1])
            for d in walk(section)
            if d.get("tag") == "details" and text(d["children"][0]) == "Model output"
        ]
        assert len(outputs) == 1, section
        found.append((float(header.group(1)), outputs[0]))
    return found


def test_rubric_grader_scores_one_step(recipes: Recipes, tmp_path: Path) -> None:
    """One step of 1 prompt × 2 rollouts (policy max_tokens 16), each graded once: 20 s when
    the grader stops early, up to ~6 min when it runs to 2048 tokens on a busy machine."""
    rest = tinker.RestClient(base_url=recipes.server.base_url, api_key=API_KEY)
    sessions_before = set(session_samplers(rest))

    log_path = tmp_path / "rubric"
    args = [
        f"grader_llm_name={MODEL}",
        "grader_renderer_name=qwen3_instruct",
        f"train_jsonl_path={DATA / 'rubric_train.jsonl'}",
        f"test_jsonl_path={DATA / 'rubric_test.jsonl'}",
        "groups_per_batch=1",
        f"train_group_size={GROUP_SIZE}",
        "max_tokens=16",
        "lora_rank=8",
        "eval_every=0",
        "save_every=0",
        "max_steps=1",
        "behavior_if_log_dir_exists=delete",
    ]
    recipes.run("recipes.rubric.train", log_path, args, timeout=1500)

    rows = [r for r in metrics_by_step(log_path) if REWARD in r]
    assert [r["step"] for r in rows] == [0], rows
    r = rows[0]
    assert r["env/all/total_episodes"] == GROUP_SIZE, r
    for key in (REWARD, "env/all/rubric_score", "env/all/format"):
        assert math.isfinite(r[key]), (key, r)
    assert 0.0 <= r["env/all/rubric_score"] <= 1.0, r
    assert 0.0 <= r["env/all/format"] <= 1.0, r
    assert -FORMAT_PENALTY <= r[REWARD] <= 1.0, r
    expected = r["env/all/rubric_score"] - FORMAT_PENALTY * (1 - r["env/all/format"])
    assert r[REWARD] == pytest.approx(expected, abs=1e-6), r
    assert abs(r["optim/kl_sample_train_v1"]) < 0.01, r

    # The grader answered every rollout, and each reward is the score its answer holds.
    logtree = json.loads((log_path / "iteration_000000" / "train_logtree.json").read_text())
    graded = grades(logtree)
    assert len(graded) == GROUP_SIZE, graded
    regex = read_jsonl(DATA / "rubric_train.jsonl")[0]["rubric_items"][0]["extraction_regex"]
    for score, output in graded:
        assert output.strip(), graded
        match = re.search(regex, output, re.DOTALL)
        assert score == pytest.approx(float(match.group(1)) if match else 0.0, abs=1e-3)

    # The grader sampled the base model through its own session(s): no LoRA, no model_path.
    new = {s: v for s, v in session_samplers(rest).items() if s not in sessions_before}
    base = [x for v in new.values() for x in v if x.base_model == MODEL and not x.model_path]
    assert base, new
    check_checkpoints(recipes.server, log_path, ["final"])
