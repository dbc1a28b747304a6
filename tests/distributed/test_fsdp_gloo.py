"""A 2-rank FSDP2 gang on CPU/gloo (tinkerd/model/fsdp.py) equals the in-process worker.

The ranks are launched with torchrun (`fsdp_scenario.py`), both tiny models in one launch; the
reference is the same scenario on a plain `ModelWorker` in this process.
"""

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsdp_scenario
import pytest
import torch
from unit.numerics import assert_close_scaled

from tinkerd.model.fsdp import filler, merge_outputs, split_rows
from tinkerd.model.loading import load_base_model
from tinkerd.model.types import ForwardBackwardInput, ForwardBackwardOutput
from tinkerd.model.worker import ModelWorker

SCRIPT = Path(fsdp_scenario.__file__)
# Longest sum behind one value: the vocabulary (320) in the softmax and its backward, or the
# tokens summed into a LoRA gradient (about 150 here).
TERMS = 512


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gang_results(
    tiny_model_dir: Path, tiny_tied_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Run the scenario on 2 ranks for both models; the directory of the per-rank results."""
    out = tmp_path_factory.mktemp("fsdp")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(SCRIPT),
        str(out),
        str(tiny_model_dir),
        str(tiny_tied_model_dir),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def load(out: Path, model_dir: Path, rank: int) -> dict[str, Any]:
    return torch.load(out / f"{model_dir.name}.rank{rank}.pt", weights_only=False)


def assert_outputs_close(
    actual: list[ForwardBackwardOutput], expected: list[ForwardBackwardOutput], what: str
) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.metrics.keys() == e.metrics.keys(), f"{what}[{i}]"
        assert len(a.loss_fn_outputs) == len(e.loss_fn_outputs), f"{what}[{i}]"
        for j, (x, y) in enumerate(zip(a.loss_fn_outputs, e.loss_fn_outputs, strict=True)):
            for key in ("logprobs", "elementwise_loss"):
                assert_close_scaled(x[key], y[key], terms=TERMS, msg=f"{what}[{i}][{j}] {key}")
        losses = torch.cat([y["elementwise_loss"] for y in e.loss_fn_outputs])
        tol = TERMS * torch.finfo(torch.float32).eps * float(losses.abs().sum())
        assert abs(a.metrics["loss:sum"] - e.metrics["loss:sum"]) <= tol, f"{what}[{i}] loss:sum"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_two_ranks_equal_in_process_worker(
    gang_results: Path, tiny_model_dir: Path, tiny_tied_model_dir: Path, tied: bool
) -> None:
    model_dir = tiny_tied_model_dir if tied else tiny_model_dir
    expected = fsdp_scenario.run(ModelWorker(load_base_model(str(model_dir), data_dir=model_dir)))
    rank0, rank1 = load(gang_results, model_dir, 0), load(gang_results, model_dir, 1)

    for key in ("first", "head_only", "second", "forward_only"):
        assert_outputs_close(rank0[key], expected[key], key)
        assert_outputs_close(rank1[key], rank0[key], f"{key} (rank 1)")

    for stage in ("grads_first", "grads"):
        assert rank0[stage].keys() == expected[stage].keys()
        for name, want in expected[stage].items():
            got = rank0[stage][name]
            assert (got is None) == (want is None), f"{stage} {name}: has a gradient or not"
            if want is not None:
                assert_close_scaled(got, want, terms=TERMS, msg=f"{stage} {name}")
                assert torch.equal(rank1[stage][name], got), f"{stage} {name}: ranks differ"

    for adapter in fsdp_scenario.ADAPTERS:
        got, want = rank0["steps"][adapter], expected["steps"][adapter]
        assert got.step == want.step == 1
        assert abs(got.grad_norm - want.grad_norm) <= TERMS * 1.2e-7 * want.grad_norm, adapter
        # Adam's first step moves a weight by lr * g / (|g| + eps): a gradient difference dg
        # moves it by at most lr * dg / eps.
        names = [n for n in expected["grads"] if n.startswith(f"{adapter}/")]
        grad_diff = max(
            float((rank0["grads"][n] - expected["grads"][n]).abs().max()) for n in names
        )
        adam = fsdp_scenario.ADAM
        bound = adam.learning_rate * grad_diff / adam.eps
        for name in names:
            w, want_w = rank0["weights"][name], expected["weights"][name]
            tol = bound + 4 * torch.finfo(torch.float32).eps * float(want_w.abs().max())
            assert float((w - want_w).abs().max()) <= tol, f"weights {name}"
    assert rank0["pending"] == expected["pending"] == dict.fromkeys(fsdp_scenario.ADAPTERS, False)

    # Adapters are replicated: identical on both ranks, the unseeded one included.
    for name, w in rank0["weights"].items():
        assert torch.equal(rank1["weights"][name], w), f"{name}: ranks differ"

    def tokens(outputs: list) -> list[list[int]]:
        return [s.tokens for out in outputs for s in out.sequences]

    assert tokens(rank0["samples"]) == tokens(expected["samples"])
    assert tokens(rank1["unseeded"]) == tokens(rank0["unseeded"])
    # Each rank holds its share of the base only (embeddings and head sharded too).
    full = sum(
        p.numel() * p.element_size()
        for p in load_base_model(str(model_dir), data_dir=model_dir).model.parameters()
    )
    assert rank0["base_bytes"] < 0.6 * full and rank1["base_bytes"] < 0.6 * full


def test_split_rows_is_every_other_row_grouped_by_input() -> None:
    rows = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]
    assert split_rows(rows, 0, 2) == [(0, [0, 2]), (2, [0])]
    assert split_rows(rows, 1, 2) == [(0, [1]), (1, [0])]
    assert split_rows(rows[:1], 1, 2) == []


def test_merge_outputs_restores_order_and_reduces_metrics() -> None:
    def out(values: list[float], metrics: dict[str, float]) -> ForwardBackwardOutput:
        return ForwardBackwardOutput(
            [{"elementwise_loss": torch.tensor([v])} for v in values], metrics
        )

    rank0 = [(0, [0, 2], out([1.0, 3.0], {"loss:sum": 4.0, "a:mean": 1.0, "b:max": 2.0}))]
    rank1 = [
        (0, [1], out([2.0], {"loss:sum": 2.0, "a:mean": 4.0, "b:max": 5.0})),
        (1, [0], out([7.0], {"loss:sum": 7.0})),
    ]
    merged = merge_outputs(2, [rank0, rank1])
    assert [float(d["elementwise_loss"]) for d in merged[0].loss_fn_outputs] == [1.0, 2.0, 3.0]
    # a:mean is weighted by datums: (2 x 1.0 + 1 x 4.0) / 3.
    assert merged[0].metrics == {"loss:sum": 6.0, "a:mean": 2.0, "b:max": 5.0}
    assert merged[1].metrics == {"loss:sum": 7.0}


def test_filler_trains_nothing() -> None:
    inputs = [ForwardBackwardInput("a", [fsdp_scenario.datum(4, 0)])]
    training = filler(inputs, "a")
    assert not training.forward_only and training.adapter_id == "a"
    assert float(training.data[0].loss_fn_inputs["weights"].abs().sum()) == 0.0
    assert filler(inputs, None).forward_only
