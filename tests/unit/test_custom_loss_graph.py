"""Server-side custom losses: graphs traced and encoded by the SDK's own code
(`tinker.lib.public_interfaces.custom_loss.trace_loss` + `encode_graph`) and rebuilt by
tinkerd.model.custom_loss give the same values and gradients as the Python functions; every
graph that is not allowed, malformed or too large is refused naming the node; hostile graphs
never raise anything else, never call anything off the allowlist, and never allocate past
the caps."""

import copy
import json
import math
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from tinkerd.model import custom_loss as cl
from tinkerd.model.custom_loss import CustomLoss, CustomLossError, build


def upload(fn: Any, ranks: dict[str, int]) -> tuple[str, list[dict], dict]:
    """What the SDK sends for `fn`: name, inputs, graph (plain JSON)."""
    handle = trace_loss(fn, ranks, "session")
    graph = encode_graph(handle).model_dump(mode="json")
    inputs = [i.model_dump(mode="json") for i in handle.inputs]
    return handle.name, json.loads(json.dumps(inputs)), json.loads(json.dumps(graph))


def rebuilt(fn: Any, ranks: dict[str, int]) -> CustomLoss:
    return build(*upload(fn, ranks))


# -- real user losses ---------------------------------------------------------------------------


def neg_ll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/neg_ll:sum": loss}


def dpo(logprobs, weights, ref_margin, beta):
    chosen = (logprobs * weights).sum()
    margin = beta * (chosen - ref_margin)
    loss = -F.logsigmoid(margin)
    return loss, {"custom/margin:mean": margin.detach(), "custom/acc:mean": (margin > 0).float()}


def clipped_is(logprobs, sampler_logprobs, advantages):
    ratio = torch.exp(logprobs - sampler_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    n = logprobs.shape[0]
    return per_token.sum() / n, {"custom/ratio:mean": ratio.mean().detach()}


def topk_distill(logprobs, teacher):
    """[T, K] logprobs against a teacher distribution."""
    p = torch.softmax(teacher, dim=-1)
    loss = -(p * torch.log_softmax(logprobs, dim=-1)).sum(dim=-1).mean()
    return loss, {"custom/entropy:mean": -(p * p.clamp_min(1e-9).log()).sum(-1).mean()}


def shaped(logprobs, mask):
    z = torch.zeros(logprobs.shape[0], dtype=torch.float32)
    cum = torch.cumsum(logprobs * mask, dim=0)
    tail = logprobs[1:].sum() + logprobs.new_ones(()) * 0.5
    loss = (cum.mean() + z.sum() - tail * math.sqrt(2.0)) ** 2
    return loss, {"custom/len:sum": logprobs.new_ones(()) * logprobs.size(0)}


REAL_LOSSES = [
    (neg_ll, {"logprobs": 1, "weights": 1}),
    (dpo, {"logprobs": 1, "weights": 1, "ref_margin": 0, "beta": 0}),
    (clipped_is, {"logprobs": 1, "sampler_logprobs": 1, "advantages": 1}),
    (topk_distill, {"logprobs": 2, "teacher": 2}),
    (shaped, {"logprobs": 1, "mask": 1}),
]


def example_inputs(ranks: dict[str, int], t: int = 7, k: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, rank in ranks.items():
        shape = {0: (), 1: (t,), 2: (t, k)}[rank]
        value = torch.randn(shape, generator=gen)
        out.append(-value.abs() if name == "logprobs" else value)
    return out


@pytest.mark.parametrize("fn,ranks", REAL_LOSSES, ids=lambda x: getattr(x, "__name__", ""))
def test_rebuilt_graph_matches_python_value_and_gradient(fn: Any, ranks: dict[str, int]) -> None:
    loss = rebuilt(fn, ranks)
    values = example_inputs(ranks)
    lp_a = values[0].clone().requires_grad_(True)
    lp_b = values[0].clone().requires_grad_(True)
    got, got_metrics = loss.run(lp_a, *values[1:])
    want, want_metrics = fn(lp_b, *values[1:])
    torch.testing.assert_close(got, want)
    assert got_metrics.keys() == want_metrics.keys()
    for key in want_metrics:
        torch.testing.assert_close(got_metrics[key], want_metrics[key])
    (g_a,) = torch.autograd.grad(got, lp_a)
    (g_b,) = torch.autograd.grad(want, lp_b)
    torch.testing.assert_close(g_a, g_b)


@pytest.mark.parametrize("fn,ranks", REAL_LOSSES, ids=lambda x: getattr(x, "__name__", ""))
def test_called_like_a_builtin_loss(fn: Any, ranks: dict[str, int]) -> None:
    """`loss(lp, inputs, config)`: per-token values sum to the loss; its gradient is the
    loss's; metrics as the SDK's client-side path reports them (plus surrogate_loss:sum)."""
    loss = rebuilt(fn, ranks)
    values = example_inputs(ranks)
    names = list(ranks)[1:]
    # Rank-0 inputs arrive as 1-element tensors (protobuf has no scalar shape).
    inputs = {
        n: v.reshape(1) if v.dim() == 0 else v for n, v in zip(names, values[1:], strict=True)
    }
    targets = torch.zeros(values[0].shape, dtype=torch.long)
    loss.check_datum(0, {"target_tokens": targets, **inputs})
    lp = values[0].clone().requires_grad_(True)
    per_token, metrics = loss(lp, {"target_tokens": targets, **inputs}, {})
    assert per_token.shape == (values[0].shape[0],)
    lp_ref = values[0].clone().requires_grad_(True)
    want, want_metrics = fn(lp_ref, *values[1:])
    assert float(per_token.sum()) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    per_token.sum().backward()
    (grad,) = torch.autograd.grad(want, lp_ref)
    torch.testing.assert_close(lp.grad, grad)
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6)
    assert metrics["surrogate_loss:sum"] == pytest.approx(float((grad * values[0]).sum()), rel=1e-5)


def test_check_datum_checks_ranks() -> None:
    loss = rebuilt(dpo, {"logprobs": 1, "weights": 1, "ref_margin": 0, "beta": 0})
    assert loss.required == ("target_tokens", "weights", "ref_margin", "beta")
    assert loss.scalar_inputs == {"ref_margin", "beta"}
    good = {
        "target_tokens": torch.zeros(4, dtype=torch.long),
        "weights": torch.ones(4),
        "ref_margin": torch.zeros(1),
        "beta": torch.ones(1),
    }
    loss.check_datum(0, good)
    for key, value in [
        ("target_tokens", torch.zeros(4, 2, dtype=torch.long)),
        ("weights", torch.ones(4, 2)),
        ("beta", torch.ones(2)),
        ("beta", torch.tensor([math.nan])),
    ]:
        with pytest.raises(cl.LossInputError, match=key):
            loss.check_datum(0, {**good, key: value})


# -- refusals -------------------------------------------------------------------------------


def base_upload() -> tuple[str, list[dict], dict]:
    return upload(neg_ll, {"logprobs": 1, "weights": 1})


def with_node(node: dict, before_output: bool = True) -> tuple[str, list[dict], dict]:
    """neg_ll's graph with `node` inserted just before the output."""
    name, inputs, graph = base_upload()
    graph["nodes"].insert(len(graph["nodes"]) - 1 if before_output else 2, node)
    return name, inputs, graph


def call(op: str, target: str, args: list, kwargs: dict | None = None, name: str = "evil") -> dict:
    return {"op": op, "name": name, "target": target, "args": args, "kwargs": kwargs or {}}


LP = {"ref": "logprobs"}

REFUSED_NODES = [
    call("call_module", "linear", [LP]),
    call("get_attr", "weight", []),
    call("call_function", "builtins.open", ["/etc/passwd"]),
    call("call_function", "open", ["/etc/passwd"]),
    call("call_function", "eval", ["1+1"]),
    call("call_function", "builtins.eval", ["1+1"]),
    call("call_function", "exec", ["import os"]),
    call("call_function", "__import__", ["os"]),
    call("call_function", "builtins.__import__", ["os"]),
    call("call_function", "getattr", [LP, "__class__"]),
    call("call_function", "getattr", [LP, "data"]),
    call("call_function", "getattr", [LP, "grad"]),
    call("call_function", "builtins.getattr", [LP, "shape"]),
    call("call_function", "os.system", ["true"]),
    call("call_function", "torch.load", ["x"]),
    call("call_function", "torch.save", [LP, "x"]),
    call("call_function", "torch.empty", [10]),
    call("call_function", "torch.rand", [10]),
    call("call_function", "torch.as_strided", [LP, [10], [1]]),
    call("call_function", "torch.ops.aten.add", [LP, LP]),
    call("call_function", "torch._C._nn.linear", [LP, LP]),
    call("call_function", "operator.setitem", [LP, 0, 1.0]),
    call("call_function", "operator.iadd", [LP, 1.0]),
    call("call_function", "operator.lshift", [1, 10**6]),
    call("call_function", "math.factorial", [10**6]),
    call("call_function", "torch.add", [LP, LP], {"out": LP}),
    call("call_function", "torch.zeros", [4], {"device": {"device": "cuda"}}),
    call("call_function", "torch.zeros", [4], {"requires_grad": True}),
    call("call_method", "item", [LP]),
    call("call_method", "tolist", [LP]),
    call("call_method", "numpy", [LP]),
    call("call_method", "backward", [LP]),
    call("call_method", "__class__", [LP]),
    call("call_method", "__reduce__", [LP]),
    call("call_method", "_version", [LP]),
    call("call_method", "add_", [LP, 1.0]),
    call("call_method", "zero_", [LP]),
    call("call_method", "copy_", [LP, LP]),
    call("call_method", "set_", [LP]),
    call("call_method", "resize_", [LP, 10**9]),
    call("call_method", "data_ptr", [LP]),
    call("call_method", "register_hook", [LP, "x"]),
    call("call_method", "cuda", [LP]),
    call("call_method", "to", [LP, "cuda"]),
    call("call_method", "to", [LP, {"device": "cuda"}]),
    call("call_method", "exp", []),
    call("call_function", "torch.exp", [{"ref": "nowhere"}]),
    call("call_function", "torch.exp", [{"ref": "output"}]),
    call("call_function", "torch.exp", [{"lambda": "x"}]),
    call("call_function", "torch.exp", [{"ref": "logprobs", "extra": 1}]),
    call("call_function", "torch.exp", [{"dtype": "complex64"}]),
    call("call_function", "torch.exp", [{"slice": [0.5, 1, None]}]),
    call("call_function", "torch.exp", [2**64]),
    call("call_function", "torch.exp", ["x" * 1000]),
    call("call_function", "torch.exp", [LP], {"bad key": 1}),
    call("call_function", "torch.exp", [LP], name="bad name!"),
    call("call_function", "torch.exp", [LP], name="logprobs"),  # duplicate
    call("call_function", 7, [LP]),  # type: ignore[arg-type]
    call("mystery", "torch.exp", [LP]),
    call("placeholder", "extra", []),
    {"op": "call_function", "name": "x", "target": "torch.exp", "args": [LP], "code": "1"},
    {"op": "call_function", "name": "x", "target": "torch.exp", "args": "notalist"},
]


@pytest.mark.parametrize("node", REFUSED_NODES, ids=lambda n: f"{n.get('op')}-{n.get('target')}")
def test_refused_nodes_name_the_node(node: dict) -> None:
    with pytest.raises(CustomLossError) as info:
        build(*with_node(node))
    err = info.value
    assert err.node is not None, str(err)
    assert str(err).startswith(f"node {err.node!r} (op {err.op}, target ")
    if isinstance(node.get("name"), str) and cl.NODE_NAME.fullmatch(node["name"]):
        assert err.node == node["name"]


def test_refused_whole_graphs() -> None:
    name, inputs, graph = base_upload()
    cases: list[tuple[Any, Any, Any]] = [
        (name, inputs, {"format": 2, "nodes": graph["nodes"]}),
        (name, inputs, {"nodes": []}),
        (name, inputs, {"nodes": "x"}),
        (name, inputs, []),
        (name, inputs, {"nodes": graph["nodes"][:-1]}),  # no output
        (name, [], graph),
        (name, [{"name": "weights", "rank": 1}, {"name": "logprobs", "rank": 1}], graph),
        (name, [{"name": "logprobs", "rank": 0}, {"name": "weights", "rank": 1}], graph),
        (name, [{"name": "logprobs", "rank": 1}, {"name": "Weights", "rank": 1}], graph),
        (name, [{"name": "logprobs", "rank": 1}, {"name": "weights", "rank": 3}], graph),
        (name, [{"name": "logprobs", "rank": 1}, {"name": "weights", "rank": True}], graph),
        (name, [{"name": "logprobs", "rank": 1}, {"name": "w" * 65, "rank": 1}], graph),
        (name, [{"name": "logprobs", "rank": 1}], graph),  # a placeholder too many
        ("", inputs, graph),
        (None, inputs, graph),
    ]
    for case in cases:
        with pytest.raises(CustomLossError):
            build(*case)


def test_too_many_params() -> None:
    names = ["logprobs"] + [f"x{i}" for i in range(16)]
    inputs = [{"name": n, "rank": 1} for n in names]
    nodes = [{"op": "placeholder", "name": n, "target": n} for n in names]
    nodes.append(
        {"op": "output", "name": "output", "target": "output", "args": [{"tuple": [LP, {}]}]}
    )
    with pytest.raises(CustomLossError, match="at most 16"):
        build("many", inputs, {"nodes": nodes})


def test_too_many_nodes_and_too_much_json() -> None:
    name, inputs, graph = base_upload()
    chain = [call("call_function", "torch.exp", [LP], name=f"n{i}") for i in range(cl.MAX_NODES)]
    big = copy.deepcopy(graph)
    big["nodes"][2:2] = chain
    with pytest.raises(CustomLossError, match="nodes; at most"):
        build(name, inputs, big)
    fat = with_node(call("call_function", "torch.tensor", [[0.0] * 300_000]))
    with pytest.raises(CustomLossError, match="bytes of JSON"):
        build(*fat)
    deep: Any = 0.0
    for _ in range(cl.MAX_ARG_DEPTH + 2):
        deep = [deep]
    with pytest.raises(CustomLossError, match="nested deeper"):
        build(*with_node(call("call_function", "torch.tensor", [deep])))


def test_bad_outputs() -> None:
    for out in [
        [LP],
        [{"tuple": [LP]}],
        [{"tuple": [1.0, {"dict": {}}]}],
        [{"tuple": [LP, {"dict": {"loss:sum": LP}}]}],
        [{"tuple": [LP, {"dict": {"custom/Big:sum": LP}}]}],
        [{"tuple": [LP, {"dict": {"custom/x:max": LP}}]}],
        [{"tuple": [LP, {"dict": {"custom/x:sum": 1.0}}]}],
        [{"tuple": [LP, [LP]]}],
    ]:
        name, inputs, graph = base_upload()
        graph["nodes"][-1]["args"] = out
        with pytest.raises(CustomLossError) as info:
            build(name, inputs, graph)
        assert info.value.op == "output"


# -- memory and time bombs ----------------------------------------------------------------------

BOMBS = [
    call("call_function", "torch.zeros", [10**12]),
    call("call_function", "torch.ones", [[100_000, 100_000]]),
    call("call_function", "torch.full", [{"tuple": [10**6, 10**6]}, 1.0]),
    call("call_function", "torch.arange", [0, 10**15]),
    call("call_function", "torch.linspace", [0.0, 1.0, 10**12]),
    call("call_method", "repeat", [LP, 10**9]),
    call("call_method", "expand", [LP, 10**8, -1]),
    call("call_method", "tile", [LP, [10**9]]),
    call("call_method", "new_zeros", [LP, [10**6, 10**6]]),
    call("call_method", "new_full", [LP, [10**10], 0.0]),
    call("call_method", "repeat_interleave", [LP, 10**9]),
    call("call_function", "torch.nn.functional.pad", [LP, [0, 10**10]]),
    call("call_function", "operator.mul", [{"ref": "logprobs"}, {"ref": "logprobs"}]),  # ok
]


def run_with(node: dict, t: int = 8) -> None:
    loss = build(*with_node(node))
    loss.run(-torch.rand(t), torch.ones(t))


@pytest.mark.parametrize("node", BOMBS[:-1], ids=lambda n: f"{n['target']}")
def test_memory_bombs_refused_before_allocation(node: dict) -> None:
    real_empty = torch.empty
    allocated: list[int] = []

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_empty(*args, **kwargs)
        if out.device.type != "meta":
            allocated.append(out.numel())
        return out

    with mock.patch.object(torch, "empty", spy), pytest.raises(CustomLossError) as info:
        run_with(node)
    assert info.value.node == "evil"
    assert "cap for this datum" in str(info.value)
    assert not any(n > cl.NODE_CAP_MAX for n in allocated)


def test_broadcast_and_outer_bombs() -> None:
    """An outer product by broadcasting: [N, 1] * [1, N] past the cap, refused at meta time."""
    name, inputs, graph = base_upload()
    n = 4096  # 4096^2 = 16.7M > cap for a 2 x 4096-element datum (64 x 8192 = 524288)
    nodes = graph["nodes"]
    extra = [
        call("call_method", "unsqueeze", [LP, 1], name="col"),
        call("call_method", "unsqueeze", [LP, 0], name="row"),
        call("call_function", "operator.mul", [{"ref": "col"}, {"ref": "row"}], name="outer"),
    ]
    nodes[2:2] = extra
    loss = build(name, inputs, graph)
    with pytest.raises(CustomLossError) as info:
        loss.run(-torch.rand(n), torch.ones(n))
    assert info.value.node == "outer"


def test_total_output_cap() -> None:
    """Many nodes each under the per-node cap still stop at the per-datum total."""
    name, inputs, graph = base_upload()
    chain = [call("call_method", "repeat", [LP, 60], name=f"r{i}") for i in range(40)]
    graph["nodes"][2:2] = chain
    loss = build(name, inputs, graph)
    with pytest.raises(CustomLossError, match="graph's outputs hold"):
        loss.run(-torch.rand(1024), torch.ones(1024))


def test_python_int_bombs() -> None:
    for node in [
        call("call_function", "operator.pow", [10, 10**6]),
        call("call_function", "operator.mul", [[0], 10**9]),
        call("call_function", "operator.mul", ["x", 10**9]),
        call("call_function", "operator.mul", [2**62, 2**62]),
        call("call_function", "operator.floordiv", [1, 0]),
        call("call_function", "math.exp", [1e6]),
    ]:
        with pytest.raises(CustomLossError) as info:
            run_with(node)
        assert info.value.node == "evil"


def test_matmul_cost_capped() -> None:
    name, inputs, graph = base_upload()
    graph["nodes"][2:2] = [
        call("call_method", "unsqueeze", [LP, 1], name="col"),
        call("call_method", "expand", [{"ref": "col"}, -1, 256], name="wide"),
        call("call_function", "torch.matmul", [{"ref": "wide"}, {"ref": "wide"}], name="mm"),
    ]
    graph["nodes"][4]["args"] = [{"ref": "col"}, -1, 2048]
    graph["nodes"][5]["args"] = [{"ref": "wide"}, {"ref": "tw"}]
    graph["nodes"].insert(5, call("call_method", "t", [{"ref": "wide"}], name="tw"))
    loss = build(name, inputs, graph)
    with pytest.raises(CustomLossError) as info:
        loss.run(-torch.rand(2048), torch.ones(2048))
    assert info.value.node in ("mm", "wide")


# -- hostile-graph fuzz ---------------------------------------------------------------------

TARGETS = [
    *sorted(cl.FUNCTIONS)[::7],
    "getattr",
    "builtins.eval",
    "open",
    "__import__",
    "os.system",
    "torch.empty",
    "subprocess.run",
    "operator.setitem",
]
METHODS = [*sorted(cl.METHODS)[::5], "item", "backward", "__class__", "_foo", "add_", "numpy"]
NAMES = st.sampled_from(["logprobs", "weights", "a", "b", "c", "output", "__x", "bad name"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["shape", "sum", "__class__", "dim", "mean", "cuda"]),
)


def arg_strategy() -> st.SearchStrategy[Any]:
    leaf = st.one_of(
        SCALARS,
        NAMES.map(lambda n: {"ref": n}),
        st.sampled_from(["float32", "int64", "complex64", "bad"]).map(lambda d: {"dtype": d}),
        st.sampled_from(["inf", "-inf", "nan", "1"]).map(lambda f: {"float": f}),
        st.sampled_from(["cpu", "cuda", "meta"]).map(lambda d: {"device": d}),
        st.just({"ellipsis": True}),
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.lists(inner, max_size=4).map(lambda x: {"tuple": x}),
            st.lists(inner, min_size=3, max_size=3).map(lambda x: {"slice": x}),
            st.dictionaries(st.sampled_from(["dim", "out", "keepdim", "x"]), inner, max_size=2).map(
                lambda d: {"dict": d}
            ),
        ),
        max_leaves=8,
    )


NODE = st.fixed_dictionaries(
    {
        "op": st.sampled_from([*cl.OPS, "call_function", "call_function", "call_method", "bad"]),
        "name": st.sampled_from(["a", "b", "c", "d", "e", "logprobs", "output", "1x"]),
        "target": st.one_of(st.sampled_from(TARGETS), st.sampled_from(METHODS)),
        "args": st.lists(arg_strategy(), max_size=4),
        "kwargs": st.dictionaries(st.sampled_from(["dim", "out", "dtype", "x"]), arg_strategy()),
    }
)


class Forbidden(Exception):
    pass


def _forbid(*args: Any, **kwargs: Any) -> Any:
    raise Forbidden("a disallowed callable ran")


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(nodes=st.lists(NODE, max_size=6), t=st.integers(1, 6), keep_output=st.booleans())
def test_hostile_graph_fuzz(nodes: list[dict], t: int, keep_output: bool) -> None:
    name, inputs, graph = base_upload()
    head, out = graph["nodes"][:2], graph["nodes"][2:]
    graph["nodes"] = head + nodes + (out if keep_output else [])
    with (
        mock.patch("builtins.eval", _forbid),
        mock.patch("builtins.exec", _forbid),
        mock.patch("builtins.open", _forbid),
        mock.patch("os.system", _forbid),
        mock.patch.object(torch, "empty_like", _forbid),
        mock.patch.object(torch.Tensor, "item", _forbid),
        mock.patch.object(torch.Tensor, "backward", _forbid),
    ):
        try:
            loss = build(name, inputs, graph)
        except CustomLossError:
            return
        try:
            per_token, metrics = loss(-torch.rand(t), {"weights": torch.rand(t)}, {})
        except CustomLossError:
            return
    assert per_token.shape == (t,)
    assert all(isinstance(v, float) for v in metrics.values())
