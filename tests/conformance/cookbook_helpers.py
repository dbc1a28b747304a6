"""Helpers for the cookbook conformance tests (importable as `cookbook_helpers`)."""

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tinker_cookbook
from e2e_helpers import Server

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# SmolLM2's template is plain ChatML; qwen3_instruct renders it token for token (see conftest).
RENDERER = "qwen3_instruct"
API_KEY = "tml-conformance"
TINKERD = Path(sys.executable).parent / "tinkerd"
EXAMPLE_DATA = Path(tinker_cookbook.__file__).parent / "example_data"
# A recipe that cannot reach the server retries for 5 minutes (SDK MAX_WAIT_TIME); stop sooner.
RECIPE_TIMEOUT_S = 600


class Recipes:
    """Runs `python -m tinker_cookbook.<module> key=value ...` against the server."""

    def __init__(self, server: Server, hf_cache: Path) -> None:
        self.server = server
        self.env = {
            **os.environ,
            "TINKER_BASE_URL": server.base_url,  # for recipes without a base_url field
            "TINKER_API_KEY": API_KEY,
            "TINKER_TELEMETRY": "0",
            "HF_HUB_CACHE": str(hf_cache),
            "HF_HOME": str(hf_cache.parent),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
        }

    def start(
        self, module: str, log_path: Path, args: Sequence[str], *, base_url_arg: bool = True
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start a recipe without waiting (for tests that interrupt it); output goes to the
        returned file."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", f"tinker_cookbook.{module}"]
        cmd += [f"model_name={MODEL}", f"renderer_name={RENDERER}", f"log_path={log_path}"]
        if base_url_arg:
            cmd.append(f"base_url={self.server.base_url}")
        cmd += list(args)
        env = {**self.env, "TINKER_COOKBOOK_RUNS_DIR": str(log_path.parent)}
        out_path = log_path.parent / f"{log_path.name}.out"
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent
            )
        return proc, out_path

    def run(
        self,
        module: str,
        log_path: Path,
        args: Sequence[str],
        *,
        base_url_arg: bool = True,
        timeout: float = RECIPE_TIMEOUT_S,
    ) -> str:
        """Run a recipe to completion; fail with the tail of its output otherwise."""
        proc, out_path = self.start(module, log_path, args, base_url_arg=base_url_arg)
        try:
            code: int | str = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = f"timeout after {timeout}s"
        output = out_path.read_text(errors="replace")
        if code != 0:
            raise AssertionError(
                f"{' '.join(map(str, proc.args))}\nexited with {code}:\n{output[-6000:]}\n"
                f"--- server log tail ---\n{self.server.log()[-3000:]}"
            )
        assert "Traceback" not in output, output[-6000:]
        return output


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    assert path.exists(), f"{path} was not written"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_by_step(log_path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl (one row per step, possibly several rows per step merged), sorted by step."""
    rows: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(log_path / "metrics.jsonl"):
        rows.setdefault(row["step"], {}).update(row)
    return [rows[s] for s in sorted(rows)]


def mean(xs: Sequence[float]) -> float:
    assert xs and all(math.isfinite(x) for x in xs), xs
    return sum(xs) / len(xs)


def check_checkpoints(server: Server, log_path: Path, names: Sequence[str] | None) -> None:
    """checkpoints.jsonl lists `names` (or, if None, ends with "final"), each with tinker://
    paths to checkpoints the server has on disk."""
    rows = read_jsonl(log_path / "checkpoints.jsonl")
    if names is None:
        assert rows and rows[-1]["name"] == "final", rows
    else:
        assert [r["name"] for r in rows] == list(names), rows
    for row in rows:
        for key, kind in (("state_path", "weights"), ("sampler_path", "sampler_weights")):
            path = row.get(key)
            assert path, (key, row)
            assert path.startswith("tinker://"), path
            run_id, _, rest = path.removeprefix("tinker://").partition("/")
            assert rest == f"{kind}/{row['name']}", path
            saved = server.data_dir / "checkpoints" / run_id / kind / row["name"]
            assert saved.is_dir() and any(saved.iterdir()), f"{path}: nothing at {saved}"
