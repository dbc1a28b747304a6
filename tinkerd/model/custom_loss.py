"""Server-side custom losses: a traced torch.fx graph, uploaded as JSON, rebuilt and run here.

The SDK (`tinker.lib.public_interfaces.custom_loss`) traces the user's per-datum loss
`fn(logprobs, *inputs) -> (scalar loss, {"custom/<name>:sum|mean": value})` with
`torch.fx.symbolic_trace` and sends it node for node (`CustomLossGraph{format: 1, nodes}`).
Nothing in it is executable: `build` resolves every node against the explicit allowlists
below (a dict of qualified name → callable; tensor methods by name → `torch.Tensor`
attribute), never `eval`, `exec`, `getattr` on a module by a user-given name, or fx's own
code generation (a `GraphModule` compiles Python source from node names). The result is a
straight-line interpreter over the checked nodes.

Refused at build time (`CustomLossError` naming the node: name, op, target): `call_module`,
`get_attr` (captured tensors), functions and methods not on the allowlists (builtins such as
`open`/`eval`/`__import__`, `item`/`tolist`/`numpy`/`backward`, in-place methods, anything
starting with `_`), `getattr` other than on the attributes in `SAFE_ATTRIBUTES`, an `out=`
keyword, device constants other than `cpu`, malformed nodes or arguments, references to
unknown or later nodes, and graphs over the limits (`MAX_NODES` nodes, `MAX_GRAPH_BYTES` of
JSON, arguments nested deeper than `MAX_ARG_DEPTH` or with more than `MAX_ARG_ITEMS` items,
more than `MAX_INPUTS` inputs; input names `[a-z_][a-z0-9_]{0,63}`, `logprobs` first with rank
1 or 2, ranks 0/1/2; metric names `custom/<name>:sum|mean` as the SDK requires).

Run time, per datum (`NodeBudget`): before each call the node is run once on `meta` tensors
(shapes and dtypes only, no memory), so every size-taking argument (`zeros`, `full`,
`arange`, `repeat`, `expand`, `tile`, `new_*`, `repeat_interleave`, `pad`, `one_hot`,
broadcasting, advanced indexing, ...) is checked against the cap before anything is
allocated. After the call every output is checked again. The cap on one node's output is
64 x the datum's input elements (logprobs and the declared inputs), at least 2**16 and at
most 2**24 elements; the outputs of all nodes of one datum together may hold 16 x that, and
its matmul-like nodes together may take 1024 x its input elements in multiply-adds (at
least 2**20, at most 2**30). Python integers stay within 64 bits and sequence
repetition (`[0] * n`) is refused. A loss that breaks a cap, or fails, raises
`CustomLossError` (a `LossInputError`: the request fails with category "user").

Gradient (as the SDK's client-side path): the graph runs on a detached copy of the datum's
target logprobs; `g = dLoss/dlogprobs` is taken there and the returned per-token loss carries
`g · logprobs` to the model's backward. Its values are the datum's loss spread evenly over its
tokens, so `elementwise_loss` sums to the loss and `loss:sum` is the sum of the losses, as
client-side; metrics are the loss's own plus `surrogate_loss:sum` (Σ g · logprobs, the
client-side path's cross-entropy surrogate).
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.node import _get_qualified_name

from tinkerd.model.losses import LossInputError

__all__ = [
    "FUNCTIONS",
    "METHODS",
    "CustomLoss",
    "CustomLossError",
    "LossInput",
    "build",
]

MAX_INPUTS = 16
MAX_NODES = 1024
MAX_GRAPH_BYTES = 1 << 20
MAX_ARG_DEPTH = 16
MAX_ARG_ITEMS = 1 << 16
MAX_STR_LEN = 256
MAX_NAME_LEN = 128
# Python ints (sizes, indices, scalars) stay within 64 bits.
MAX_INT = 1 << 63
# Per datum: one node's output may hold NODE_CAP_FACTOR x the datum's input elements, within
# [NODE_CAP_MIN, NODE_CAP_MAX]; all nodes' outputs together TOTAL_CAP_FACTOR x that.
NODE_CAP_FACTOR = 64
NODE_CAP_MIN = 1 << 16
NODE_CAP_MAX = 1 << 24
TOTAL_CAP_FACTOR = 16
# Multiply-adds of all matmul-like nodes of one datum: MACS_FACTOR x the datum's input
# elements, within [2**20, 2**30].
MACS_FACTOR = 1024
MACS_MIN = 1 << 20
MACS_MAX = 1 << 30
# Length of a tuple a graph may build (shapes).
MAX_TUPLE_LEN = 64

INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
KWARG_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


class CustomLossError(LossInputError):
    """The uploaded loss is not allowed, malformed, too large, or failed on a datum. A user
    error; `node`, `op` and `target` name the node at fault (None for graph-level errors)."""

    def __init__(
        self,
        message: str,
        node: str | None = None,
        op: str | None = None,
        target: str | None = None,
    ) -> None:
        if node is not None:
            message = f"node {node!r} (op {op}, target {target!r}): {message}"
        super().__init__(message)
        self.node = node
        self.op = op
        self.target = target


# -- the allowlists --------------------------------------------------------------------------

_TORCH_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    # elementwise math
    torch.abs, torch.neg, torch.negative, torch.exp, torch.exp2, torch.expm1, torch.log,
    torch.log1p, torch.log2, torch.log10, torch.sqrt, torch.rsqrt, torch.square, torch.pow,
    torch.sigmoid, torch.tanh, torch.relu, torch.sign, torch.sin, torch.cos, torch.erf,
    torch.floor, torch.ceil, torch.round, torch.trunc, torch.frac, torch.reciprocal,
    torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.minimum, torch.maximum,
    torch.fmin, torch.fmax, torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply,
    torch.div, torch.divide, torch.true_divide, torch.floor_divide, torch.remainder,
    torch.fmod, torch.lerp, torch.logaddexp, torch.xlogy, torch.where, torch.masked_fill,
    torch.nan_to_num, torch.isnan, torch.isinf, torch.isfinite, torch.eq, torch.ne, torch.lt,
    torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or, torch.logical_not,
    torch.logical_xor, torch.special.expit,
    # reductions and scans
    torch.sum, torch.mean, torch.nansum, torch.prod, torch.std, torch.var, torch.amax,
    torch.amin, torch.max, torch.min, torch.argmax, torch.argmin, torch.logsumexp,
    torch.softmax, torch.log_softmax, torch.cumsum, torch.sort, torch.argsort, torch.topk,
    torch.any, torch.all, torch.count_nonzero,
    # indexing and shapes
    torch.gather, torch.index_select, torch.take_along_dim, torch.masked_select, torch.nonzero,
    torch.cat, torch.concat, torch.stack, torch.unsqueeze, torch.squeeze, torch.reshape,
    torch.flatten, torch.transpose, torch.permute, torch.flip, torch.roll, torch.narrow,
    torch.select, torch.chunk, torch.split, torch.unbind, torch.tril, torch.triu, torch.diff,
    torch.broadcast_to,
    # products (their multiply-adds are capped)
    torch.matmul, torch.mm, torch.mv, torch.dot, torch.outer,
    # factories (size-checked; never torch.empty*, whose memory is uninitialized)
    torch.zeros, torch.ones, torch.full, torch.zeros_like, torch.ones_like, torch.full_like,
    torch.arange, torch.linspace, torch.tensor, torch.scalar_tensor,
    # torch.nn.functional (no dropout or other randomness: replays must repeat exactly)
    F.relu, F.softplus, F.logsigmoid, F.sigmoid, F.tanh, F.silu, F.gelu, F.softmax,
    F.log_softmax, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
    F.binary_cross_entropy_with_logits, F.kl_div, F.normalize, F.one_hot, F.pad,
    F.cross_entropy, F.nll_loss,
)  # fmt: skip

_OPERATOR_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.mod, operator.pow, operator.neg, operator.pos, operator.abs, operator.eq,
    operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
    operator.or_, operator.xor, operator.invert, operator.getitem, operator.matmul,
)  # fmt: skip

_MATH_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    math.sqrt, math.exp, math.log, math.log1p, math.log2, math.log10, math.expm1, math.fabs,
    math.floor, math.ceil, math.tanh, math.sin, math.cos, math.isfinite, math.isnan,
    math.isinf, math.pow,
)  # fmt: skip


def _wire_name(fn: Callable[..., Any]) -> str:
    """The name the SDK's encoder gives `fn` (`_operator.` is sent as `operator.`)."""
    name = _get_qualified_name(fn)
    return "operator." + name.removeprefix("_operator.") if name.startswith("_operator.") else name


# Qualified name (as the SDK sends it) → the callable it stands for. Nothing else is callable.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    _wire_name(fn): fn for fn in (*_TORCH_FUNCTIONS, *_OPERATOR_FUNCTIONS, *_MATH_FUNCTIONS)
}

# Tensor methods (`call_method` targets): none in place, none leaving torch, no `_` names.
_METHOD_NAMES = (
    "abs", "neg", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt",
    "square", "pow", "sigmoid", "tanh", "relu", "sign", "sin", "cos", "erf", "floor", "ceil",
    "round", "trunc", "frac", "reciprocal", "clamp", "clip", "clamp_min", "clamp_max",
    "minimum", "maximum", "add", "sub", "mul", "div", "true_divide", "floor_divide",
    "remainder", "fmod", "lerp", "logaddexp", "xlogy", "where", "masked_fill", "nan_to_num",
    "isnan", "isinf", "isfinite", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
    "logical_or", "logical_not", "logical_xor", "sum", "mean", "nansum", "prod", "std", "var",
    "amax", "amin", "max", "min", "argmax", "argmin", "logsumexp", "softmax", "log_softmax",
    "cumsum", "sort", "argsort", "topk", "any", "all", "count_nonzero", "gather",
    "index_select", "take_along_dim", "masked_select", "nonzero", "unsqueeze", "squeeze",
    "reshape", "reshape_as", "view", "view_as", "flatten", "transpose", "permute", "t", "flip",
    "roll", "narrow", "select", "chunk", "split", "unbind", "tril", "triu", "diff", "matmul",
    "mm", "mv", "dot", "outer", "expand", "expand_as", "repeat", "repeat_interleave", "tile",
    "broadcast_to", "new_zeros", "new_ones", "new_full", "new_tensor", "float", "double",
    "half", "bfloat16", "long", "int", "bool", "to", "type_as", "detach", "clone",
    "contiguous", "size", "dim", "numel", "is_floating_point",
)  # fmt: skip
METHODS: dict[str, Callable[..., Any]] = {
    name: getattr(torch.Tensor, name) for name in _METHOD_NAMES
}

# `getattr(tensor, name)` nodes (fx records `x.shape` so): only these attributes.
SAFE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "T", "mT"})
GETATTR = "getattr"

_FACTORIES = frozenset(
    {torch.zeros, torch.ones, torch.full, torch.arange, torch.linspace, torch.tensor}
    | {torch.scalar_tensor}
)
_MATMULS = frozenset(
    {torch.matmul, torch.mm, torch.mv, torch.dot, torch.outer, operator.matmul}
    | {METHODS[m] for m in ("matmul", "mm", "mv", "dot", "outer")}
)
# Outputs whose size depends on values (no meta kernel): bounded by their inputs' elements
# times their rank.
_DATA_DEPENDENT = frozenset(
    {torch.masked_select, torch.nonzero, torch.where, operator.getitem}
    | {METHODS[m] for m in ("masked_select", "nonzero", "where")}
)
_REFUSED_KWARGS = frozenset({"out", "pin_memory", "requires_grad", "generator"})
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
        "bool",
    )
}  # fmt: skip
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
}
_CPU = torch.device("cpu")


# -- the rebuilt graph ------------------------------------------------------------------------


@dataclass(frozen=True)
class LossInput:
    name: str
    rank: int


@dataclass(frozen=True)
class _Ref:
    """An argument that is an earlier node's value."""

    name: str


@dataclass
class _Step:
    name: str
    op: str
    target: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    is_operator: bool
    is_factory: bool

    def error(self, message: str) -> CustomLossError:
        return CustomLossError(message, self.name, self.op, self.target)


@dataclass
class NodeBudget:
    """The caps of one datum's run (see the module docstring)."""

    node_cap: int
    total_cap: int
    macs_cap: int
    used: int = 0
    macs: int = 0

    @classmethod
    def for_datum(cls, input_elements: int) -> NodeBudget:
        node_cap = min(NODE_CAP_MAX, max(NODE_CAP_MIN, NODE_CAP_FACTOR * input_elements))
        macs_cap = min(MACS_MAX, max(MACS_MIN, MACS_FACTOR * input_elements))
        return cls(node_cap, TOTAL_CAP_FACTOR * node_cap, macs_cap)


@dataclass
class CustomLoss:
    """A rebuilt loss. Called like the built-in losses of tinkerd.model.losses:
    `loss(lp, inputs, config) -> (per-token loss, metrics)`; `run` is the bare graph."""

    name: str
    inputs: tuple[LossInput, ...]
    steps: list[_Step]
    placeholders: tuple[str, ...]  # node names of the inputs, in order
    loss_ref: str
    metric_refs: dict[str, str]
    _required: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self._required = ("target_tokens", *(i.name for i in self.inputs[1:]))

    @property
    def required(self) -> tuple[str, ...]:
        """The loss_fn_inputs every datum must have: target_tokens and the declared inputs."""
        return self._required

    @property
    def scalar_inputs(self) -> frozenset[str]:
        """Declared rank-0 inputs: one value per datum (sent as a 1-element tensor)."""
        return frozenset(i.name for i in self.inputs[1:] if i.rank == 0)

    def check_datum(self, index: int, inputs: Mapping[str, torch.Tensor]) -> None:
        """Raise LossInputError unless datum `index` has each declared input at its rank
        (`logprobs` has target_tokens' rank)."""
        targets = inputs.get("target_tokens")
        lp_rank = self.inputs[0].rank
        if targets is not None and targets.dim() != lp_rank:
            raise LossInputError(
                f"data[{index}].loss_fn_inputs['target_tokens'] has rank {targets.dim()}, but "
                f"loss {self.name!r} declared logprobs with rank {lp_rank}"
            )
        for spec in self.inputs[1:]:
            value = inputs.get(spec.name)
            if value is None:
                continue  # reported by the caller as missing
            ok = (
                value.numel() == 1 and value.dim() <= 1
                if spec.rank == 0
                else value.dim() == spec.rank
            )
            if not ok:
                raise LossInputError(
                    f"data[{index}].loss_fn_inputs[{spec.name!r}] has shape "
                    f"{tuple(value.shape)}, but loss {self.name!r} declared it with rank "
                    f"{spec.rank}"
                )
            if spec.rank == 0 and value.is_floating_point() and not torch.isfinite(value).all():
                raise LossInputError(f"data[{index}].loss_fn_inputs[{spec.name!r}] is NaN or inf")

    def run(self, logprobs: torch.Tensor, *args: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        """The graph on one datum: `(loss, metrics)` as the user's function returns them."""
        if len(args) != len(self.inputs) - 1:
            raise CustomLossError(f"loss {self.name!r} takes {len(self.inputs)} inputs")
        values = (logprobs, *args)
        budget = NodeBudget.for_datum(sum(v.numel() for v in values))
        env: dict[str, Any] = dict(zip(self.placeholders, values, strict=True))
        device = logprobs.device
        for step in self.steps:
            env[step.name] = _execute(step, env, budget, device)
        return env[self.loss_ref], {k: env[v] for k, v in self.metric_refs.items()}

    def __call__(
        self, lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        args = []
        for spec in self.inputs[1:]:
            value = inputs[spec.name].clone()  # the graph never sees the request's storage
            args.append(value.reshape(()) if spec.rank == 0 else value)
        leaf = lp.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss, metrics = self.run(leaf, *args)
            loss = self._check_loss(loss)
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(leaf)
        if not torch.isfinite(loss) or not torch.isfinite(grad).all():
            raise CustomLossError(f"loss {self.name!r} gave a NaN or infinite loss or gradient")
        out = {key: self._metric(key, value) for key, value in metrics.items()}
        grad = grad.detach().to(lp.dtype)
        surrogate = lp * grad
        if surrogate.dim() == 2:
            surrogate = surrogate.sum(dim=-1)
        out["surrogate_loss:sum"] = float(surrogate.detach().sum())
        n = surrogate.shape[0]
        share = (loss.detach().to(lp.dtype) / n).expand(n)
        return surrogate - surrogate.detach() + share, out

    def _check_loss(self, loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor):
            raise CustomLossError(
                f"loss {self.name!r} must return its loss as a tensor, got {type(loss).__name__}"
            )
        if loss.ndim != 0:
            raise CustomLossError(
                f"loss {self.name!r} must return a scalar loss, got shape {tuple(loss.shape)}"
            )
        if not loss.is_floating_point():
            raise CustomLossError(f"loss {self.name!r} must return a float loss, got {loss.dtype}")
        return loss

    def _metric(self, key: str, value: Any) -> float:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise CustomLossError(
                    f"loss {self.name!r} metric {key!r} must be a scalar, got shape "
                    f"{tuple(value.shape)}"
                )
            return float(value.detach().reshape(()).to(torch.float64))
        if isinstance(value, (bool, int, float)):
            return float(value)
        raise CustomLossError(
            f"loss {self.name!r} metric {key!r} must be a tensor or number, got "
            f"{type(value).__name__}"
        )


# -- build: JSON → CustomLoss ------------------------------------------------------------------


def build(name: Any, inputs: Any, graph: Any) -> CustomLoss:
    """Check and rebuild an uploaded loss (`CreateCustomLossRequest`'s name, inputs, graph as
    plain JSON data). Raises CustomLossError for anything not allowed, malformed or too large."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LEN:
        raise CustomLossError(f"name must be a string of 1 to {MAX_NAME_LEN} characters")
    specs = _inputs(inputs)
    if not isinstance(graph, dict):
        raise CustomLossError("graph must be an object {format, nodes}")
    try:
        size = len(json.dumps(graph, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise CustomLossError(f"graph is not plain JSON: {exc}") from exc
    if size > MAX_GRAPH_BYTES:
        raise CustomLossError(f"graph is {size} bytes of JSON; at most {MAX_GRAPH_BYTES}")
    if graph.get("format", 1) != 1:
        raise CustomLossError(f"graph format {graph.get('format')!r} is not supported (only 1)")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise CustomLossError("graph.nodes must be a non-empty list")
    if len(nodes) > MAX_NODES:
        raise CustomLossError(f"graph has {len(nodes)} nodes; at most {MAX_NODES}")
    return _Builder(name, specs).build(nodes)


def _inputs(inputs: Any) -> tuple[LossInput, ...]:
    if not isinstance(inputs, list) or not inputs:
        raise CustomLossError("inputs must be a non-empty list of {name, rank}")
    if len(inputs) > MAX_INPUTS:
        raise CustomLossError(
            f"the loss takes {len(inputs)} inputs; at most {MAX_INPUTS}, logprobs included"
        )
    specs = []
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise CustomLossError(f"inputs[{i}] must be an object {{name, rank}}")
        name, rank = spec.get("name"), spec.get("rank")
        if not isinstance(name, str) or not INPUT_NAME.fullmatch(name):
            raise CustomLossError(f"inputs[{i}].name {name!r} must match [a-z_][a-z0-9_]{{0,63}}")
        if type(rank) is not int or rank not in (0, 1, 2):
            raise CustomLossError(f"inputs[{i}].rank must be 0, 1 or 2, got {rank!r}")
        specs.append(LossInput(name, rank))
    if specs[0].name != "logprobs" or specs[0].rank not in (1, 2):
        raise CustomLossError("inputs[0] must be logprobs with rank 1 ([T]) or 2 ([T, K])")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise CustomLossError(f"input names must be distinct, got {names}")
    return tuple(specs)


class _Builder:
    def __init__(self, loss_name: str, specs: tuple[LossInput, ...]) -> None:
        self.loss_name = loss_name
        self.specs = specs
        self.defined: set[str] = set()
        self.items = 0

    def build(self, nodes: list[Any]) -> CustomLoss:
        placeholders: list[str] = []
        steps: list[_Step] = []
        output: tuple[str, dict[str, str]] | None = None
        for index, node in enumerate(nodes):
            name, op, target = self._header(index, node)
            where = (name, op, target)
            if output is not None:
                raise CustomLossError("the output node must be the last node", *where)
            if op == "placeholder":
                if steps or len(placeholders) >= len(self.specs):
                    raise CustomLossError(
                        "placeholders must come first, one per declared input", *where
                    )
                expected = self.specs[len(placeholders)].name
                if target != expected:
                    raise CustomLossError(
                        f"placeholder {len(placeholders)} must be input {expected!r}", *where
                    )
                if node.get("args") or node.get("kwargs"):
                    raise CustomLossError("a placeholder takes no arguments", *where)
                placeholders.append(name)
            elif op == "call_module":
                raise CustomLossError("torch.nn modules cannot be called", *where)
            elif op == "get_attr":
                raise CustomLossError(
                    "captured tensors (get_attr) are not allowed; a loss reads only logprobs "
                    "and its declared inputs",
                    *where,
                )
            elif op == "output":
                if len(placeholders) != len(self.specs):
                    raise CustomLossError(
                        f"the graph has {len(placeholders)} placeholders for "
                        f"{len(self.specs)} inputs",
                        *where,
                    )
                output = self._output(node, where)
            else:
                steps.append(self._step(node, name, op, target))
            self.defined.add(name)
        if output is None:
            raise CustomLossError("the graph has no output node")
        return CustomLoss(
            self.loss_name, self.specs, steps, tuple(placeholders), output[0], output[1]
        )

    def _header(self, index: int, node: Any) -> tuple[str, str, str]:
        if not isinstance(node, dict):
            raise CustomLossError(f"nodes[{index}] must be an object {{op, name, target, ...}}")
        name, op, target = node.get("name"), node.get("op"), node.get("target")
        shown = (
            name if isinstance(name, str) else f"nodes[{index}]",
            str(op)[:32],
            str(target)[:MAX_STR_LEN],
        )
        if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
            raise CustomLossError(
                "a node name must be an identifier of at most 128 characters", *shown
            )
        if name in self.defined:
            raise CustomLossError("node names must be unique", *shown)
        if op not in OPS:
            raise CustomLossError(f"op must be one of {', '.join(OPS)}", *shown)
        if not isinstance(target, str) or len(target) > MAX_STR_LEN:
            raise CustomLossError("target must be a string", *shown)
        extra = set(node) - {"op", "name", "target", "args", "kwargs"}
        if extra:
            raise CustomLossError(f"unknown node fields {sorted(extra)}", *shown)
        return name, op, target

    def _step(self, node: dict[str, Any], name: str, op: str, target: str) -> _Step:
        where = (name, op, target)
        args = self._args(node, where)
        kwargs = self._kwargs(node, where)
        if op == "call_function":
            if target == GETATTR:
                if len(args) != 2 or not isinstance(args[0], _Ref) or kwargs:
                    raise CustomLossError("getattr takes a node and an attribute name", *where)
                if args[1] not in SAFE_ATTRIBUTES:
                    raise CustomLossError(
                        f"attribute {args[1]!r} is not allowed; only "
                        f"{', '.join(sorted(SAFE_ATTRIBUTES))}",
                        *where,
                    )
                fn: Callable[..., Any] = getattr  # with a name from SAFE_ATTRIBUTES only
            elif target in FUNCTIONS:
                fn = FUNCTIONS[target]
            else:
                raise CustomLossError(
                    "function is not on the allowlist of torch, math and operator functions",
                    *where,
                )
        else:  # call_method
            if target.startswith("_") or target not in METHODS:
                raise CustomLossError("tensor method is not on the allowlist", *where)
            if not args:
                raise CustomLossError("a method call needs the tensor it is called on", *where)
            fn = METHODS[target]
            if target == "to":
                for value in (*args[1:], *kwargs.values()):
                    if not isinstance(value, (_Ref, torch.dtype, bool)):
                        raise CustomLossError("to() takes only a dtype here", *where)
        for key in kwargs:
            if key in _REFUSED_KWARGS:
                raise CustomLossError(f"keyword argument {key!r} is not allowed", *where)
        return _Step(
            name,
            op,
            target,
            fn,
            args,
            kwargs,
            is_operator=target.startswith("operator.") or target.startswith("math."),
            is_factory=fn in _FACTORIES,
        )

    def _args(self, node: dict[str, Any], where: tuple[str, str, str]) -> tuple[Any, ...]:
        args = node.get("args", [])
        if not isinstance(args, list):
            raise CustomLossError("args must be a list", *where)
        return tuple(self._decode(a, where, 1) for a in args)

    def _kwargs(self, node: dict[str, Any], where: tuple[str, str, str]) -> dict[str, Any]:
        kwargs = node.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise CustomLossError("kwargs must be an object", *where)
        out = {}
        for key, value in kwargs.items():
            if not KWARG_NAME.fullmatch(key):
                raise CustomLossError(f"keyword {key[:64]!r} is not a valid name", *where)
            out[key] = self._decode(value, where, 1)
        return out

    def _decode(self, value: Any, where: tuple[str, str, str], depth: int) -> Any:
        if depth > MAX_ARG_DEPTH:
            raise CustomLossError(f"arguments nested deeper than {MAX_ARG_DEPTH}", *where)
        self.items += 1
        if self.items > MAX_ARG_ITEMS:
            raise CustomLossError(f"the graph has more than {MAX_ARG_ITEMS} argument items", *where)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if abs(value) >= MAX_INT:
                raise CustomLossError("integer argument out of 64-bit range", *where)
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise CustomLossError("non-finite floats are sent as {'float': ...}", *where)
            return value
        if isinstance(value, str):
            if len(value) > MAX_STR_LEN:
                raise CustomLossError(f"string argument over {MAX_STR_LEN} characters", *where)
            return value
        if isinstance(value, list):
            return [self._decode(v, where, depth + 1) for v in value]
        if not isinstance(value, dict) or len(value) != 1:
            raise CustomLossError(f"argument {_short(value)} is not a valid encoding", *where)
        ((kind, payload),) = value.items()
        if kind == "ref":
            if not isinstance(payload, str) or payload not in self.defined:
                raise CustomLossError(
                    f"argument refers to {_short(payload)}, which is not an earlier node", *where
                )
            return _Ref(payload)
        if kind == "tuple" and isinstance(payload, list):
            return tuple(self._decode(v, where, depth + 1) for v in payload)
        if kind == "dict" and isinstance(payload, dict):
            out = {}
            for k, v in payload.items():
                if len(k) > MAX_STR_LEN:
                    raise CustomLossError("dict key too long", *where)
                out[k] = self._decode(v, where, depth + 1)
            return out
        if kind == "slice" and isinstance(payload, list) and len(payload) == 3:
            parts = [self._decode(v, where, depth + 1) for v in payload]
            if not all(p is None or type(p) is int or isinstance(p, _Ref) for p in parts):
                raise CustomLossError("slice bounds must be integers, nodes or null", *where)
            return slice(*parts)
        if kind == "ellipsis" and payload is True:
            return Ellipsis
        if kind == "float" and payload in ("inf", "-inf", "nan"):
            return float(payload)
        if kind == "dtype" and payload in _DTYPES:
            return _DTYPES[payload]
        if kind == "device" and payload == "cpu":
            return _CPU
        if kind == "layout" and payload in _LAYOUTS:
            return _LAYOUTS[payload]
        if kind == "memory_format" and payload in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[payload]
        raise CustomLossError(f"argument {_short(value)} is not allowed", *where)

    def _output(
        self, node: dict[str, Any], where: tuple[str, str, str]
    ) -> tuple[str, dict[str, str]]:
        args = self._args(node, where)
        if self._kwargs(node, where):
            raise CustomLossError("the output node takes no keyword arguments", *where)
        result = args[0] if len(args) == 1 else None
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise CustomLossError("the loss must return (loss, metrics)", *where)
        loss, metrics = result
        if not isinstance(loss, _Ref):
            raise CustomLossError("the loss must be a tensor computed by the graph", *where)
        if not isinstance(metrics, dict):
            raise CustomLossError("metrics must be a dict", *where)
        refs = {}
        for key, value in metrics.items():
            if not METRIC_KEY.fullmatch(key):
                raise CustomLossError(
                    f"metric {key[:80]!r} must be named custom/<name>:sum or custom/<name>:mean",
                    *where,
                )
            if not isinstance(value, _Ref):
                raise CustomLossError(f"metric {key!r} must be computed by the graph", *where)
            refs[key] = value.name
        return loss.name, refs


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- execution with memory and time caps ------------------------------------------------------


def _resolve(value: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(
            _resolve(value.start, env), _resolve(value.stop, env), _resolve(value.step, env)
        )
    return value


def _walk(value: Any) -> list[Any]:
    """Every leaf of nested tuples, lists and dicts (torch return types are tuples)."""
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _walk(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _walk(v)]
    return [value]


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, list):
        return [_to_meta(v) for v in value]
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    if isinstance(value, torch.device):
        return torch.device("meta")
    return value


def _check_python_operands(step: _Step, args: tuple[Any, ...]) -> None:
    """operator and math functions also run on plain Python values: keep them small."""
    if step.fn is operator.getitem:
        if not isinstance(args[0], (torch.Tensor, tuple, list)):
            raise step.error(f"cannot index a {type(args[0]).__name__}")
        return
    sequences = [a for a in args if isinstance(a, (tuple, list, str, dict))]
    if sequences:
        if step.fn is not operator.add or not all(isinstance(a, tuple) for a in args):
            raise step.error("operators on sequences are not allowed (only shape + shape)")
        if sum(len(a) for a in args) > MAX_TUPLE_LEN:
            raise step.error(f"a tuple of more than {MAX_TUPLE_LEN} items")
    if step.fn is operator.pow and len(args) == 2:
        base, exp = args
        if isinstance(base, int) and isinstance(exp, int) and abs(base) > 1 and exp > 64:
            raise step.error("integer power too large")


def _tensor_elements(value: Any) -> int:
    return sum(t.numel() for t in _walk(value) if isinstance(t, torch.Tensor))


def _precheck(
    step: _Step, args: tuple[Any, ...], kwargs: dict[str, Any], budget: NodeBudget
) -> None:
    """Run the node on meta tensors (no memory) and check its output size and cost."""
    leaves = _walk((args, kwargs))
    has_tensor = any(isinstance(v, torch.Tensor) for v in leaves)
    if not has_tensor and not step.is_factory:
        return
    meta_args, meta_kwargs = _to_meta(args), _to_meta(kwargs)
    if step.is_factory:
        meta_kwargs["device"] = torch.device("meta")
    try:
        out = step.fn(*meta_args, **meta_kwargs)
    except Exception as exc:
        if step.fn in _DATA_DEPENDENT:
            rank = max((v.dim() for v in leaves if isinstance(v, torch.Tensor)), default=1)
            bound = _tensor_elements((args, kwargs)) * max(rank, 1)
            if bound > budget.node_cap:
                raise step.error(
                    f"its output could hold {bound} elements; the cap for this datum is "
                    f"{budget.node_cap}"
                ) from None
            return
        raise step.error(f"{type(exc).__name__}: {_message(exc)}") from None
    elements = _tensor_elements(out)
    if elements > budget.node_cap:
        raise step.error(
            f"its output would hold {elements} elements; the cap for this datum is "
            f"{budget.node_cap} (64 x the datum's input elements, within [2**16, 2**24])"
        )
    if step.fn in _MATMULS:
        first = next(v for v in leaves if isinstance(v, torch.Tensor))
        budget.macs += max(elements, 1) * (first.shape[-1] if first.dim() else 1)
        if budget.macs > budget.macs_cap:
            raise step.error(
                f"the graph's products take {budget.macs} multiply-adds; the cap for this "
                f"datum is {budget.macs_cap}"
            )


def _check_output(step: _Step, out: Any, budget: NodeBudget) -> None:
    leaves = _walk(out)
    if len(leaves) > budget.node_cap:
        raise step.error("its output has too many parts")
    elements = 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.is_complex():
                raise step.error("complex tensors are not allowed")
            elements += leaf.numel()
        elif isinstance(leaf, bool | float | torch.dtype | torch.device) or leaf is None:
            pass
        elif isinstance(leaf, int):
            if abs(leaf) >= MAX_INT:
                raise step.error("integer result out of 64-bit range")
        else:
            raise step.error(f"a {type(leaf).__name__} result is not allowed")
    if elements > budget.node_cap:
        raise step.error(
            f"its output holds {elements} elements; the cap for this datum is {budget.node_cap}"
        )
    budget.used += elements
    if budget.used > budget.total_cap:
        raise step.error(
            f"the graph's outputs hold {budget.used} elements; the cap for this datum is "
            f"{budget.total_cap}"
        )


def _execute(step: _Step, env: Mapping[str, Any], budget: NodeBudget, device: torch.device) -> Any:
    args = _resolve(step.args, env)
    kwargs = _resolve(step.kwargs, env)
    if step.op == "call_method" and not isinstance(args[0], torch.Tensor):
        raise step.error(f"a method called on a {type(args[0]).__name__}, not a tensor")
    if step.fn is getattr:
        if not isinstance(args[0], torch.Tensor):
            raise step.error("getattr on a value that is not a tensor")
        return getattr(args[0], args[1])
    if step.is_operator:
        _check_python_operands(step, args)
    _precheck(step, args, kwargs, budget)
    if step.is_factory and "device" not in kwargs:
        kwargs["device"] = device
    try:
        out = step.fn(*args, **kwargs)
    except Exception as exc:
        raise step.error(f"{type(exc).__name__}: {_message(exc)}") from None
    _check_output(step, out, budget)
    return out


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if len(first) <= 300 else first[:297] + "..."
