"""Every public method of the tinker 0.38 clients, called against a live tinkerd.

`inspect` lists the public names (no leading `_`, `*_async` variants included) of
ServiceClient, TrainingClient, SamplingClient, RestClient and AdminClient. Each must have an
entry in `ENTRIES` saying whether tinkerd supports it, with a check that calls it and asserts a
meaningful result (lighter where another e2e module covers the method in depth) or, for what
tinkerd does not support, the clear error it answers. A new SDK method without an entry fails
`test_every_public_method_has_an_entry`.

COMPAT.md at the repo root is generated from `ENTRIES`: run with `TINKERD_WRITE_COMPAT=1` to
rewrite it; otherwise `test_compat_md_is_up_to_date` fails when it has drifted.
"""

import asyncio
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
import torch
from e2e_helpers import adam, sft_datum
from tinker import types

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

CLASSES = {
    "ServiceClient": tinker.ServiceClient,
    "TrainingClient": tinker.TrainingClient,
    "SamplingClient": tinker.SamplingClient,
    "RestClient": tinker.RestClient,
    "AdminClient": tinker.AdminClient,
}
KEY = "tml-sdk-surface"
SEQ = [115, 117, 114, 102, 97, 99, 101, 32, 116, 101, 115, 116]  # "surface test"
PROMPT = SEQ[:6]
COMPAT_MD = Path(__file__).resolve().parents[2] / "COMPAT.md"
HOSTED_ONLY = "not available in self-hosted tinkerd"

SUPPORTED, CLIENT_ONLY, NOT_SUPPORTED = "supported", "client-side", "not supported"


def public_methods() -> list[str]:
    return sorted(
        f"{cname}.{name}"
        for cname, cls in CLASSES.items()
        for name, _ in inspect.getmembers(cls)
        if not name.startswith("_")
    )


# -- the context the checks share ------------------------------------------------------------


@dataclass
class Ctx:
    server: Any
    sc: tinker.ServiceClient
    tc: tinker.TrainingClient
    sampler: tinker.SamplingClient
    rest: tinker.RestClient
    admin: tinker.AdminClient
    state_path: str
    sampler_path: str
    external_path: str

    def fresh_tc(self) -> tinker.TrainingClient:
        return self.sc.create_lora_training_client(base_model=self.server.model, rank=4).result()

    def session_id(self) -> str:
        return self.tc.model_id.split(":train:")[0]


@pytest.fixture(scope="module")
def ctx(clients, server) -> Ctx:
    sc = clients(KEY)
    tc = sc.create_lora_training_client(base_model=server.model, rank=4, seed=7).result()
    tc.forward_backward([sft_datum(SEQ)], "cross_entropy")
    tc.optim_step(adam(1e-2)).result()
    state_path = tc.save_state("surface-state").result().path
    sampler_path = tc.save_weights_for_sampler("surface-sampler").result().path
    external_path = tc.save_weights_external("surface-external").result().path
    sampler = sc.create_sampling_client(base_model=server.model).result()
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY)
    admin = tinker.AdminClient(base_url=server.base_url, api_key=KEY)
    return Ctx(server, sc, tc, sampler, rest, admin, state_path, sampler_path, external_path)


def call(obj: Any, name: str, is_async: bool, *args: Any, **kwargs: Any) -> Any:
    """`obj.name(...)` resolved to its value: futures are waited for; with `is_async`,
    `obj.name_async(...)` awaited (and whatever it returns awaited too) on a fresh loop."""
    if not is_async:
        out = getattr(obj, name)(*args, **kwargs)
        return out.result(timeout=120) if hasattr(out, "result") else out

    async def go() -> Any:
        out = await getattr(obj, f"{name}_async")(*args, **kwargs)
        while inspect.isawaitable(out):
            out = await out
        return out

    return asyncio.run(go())


def greedy(max_tokens: int = 3) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=max_tokens, temperature=0.0)


def assert_samples(sampler: tinker.SamplingClient, is_async: bool = False) -> None:
    res = call(sampler, "sample", is_async, types.ModelInput.from_ints(PROMPT), 2, greedy())
    assert len(res.sequences) == 2
    for seq in res.sequences:
        assert 1 <= len(seq.tokens) <= 3
        assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens)


def assert_hosted_only(fn: Callable[[], Any]) -> None:
    with pytest.raises(tinker.NotFoundError) as err:
        fn()
    assert HOSTED_ONLY in str(err.value)


def checkpoints_of(c: Ctx, run: str) -> dict[str, types.Checkpoint]:
    return {ck.tinker_path: ck for ck in c.rest.list_checkpoints(run).result().checkpoints}


# -- the entries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    status: str
    note: str
    check: Callable[[Ctx], None]


ENTRIES: dict[str, Entry] = {}


def entry(qualname: str, status: str, note: str, *, with_async: bool = False):
    """Register `check(ctx, is_async)` for `qualname` (and `qualname_async` if asked)."""

    def register(check: Callable[[Ctx, bool], None]):
        ENTRIES[qualname] = Entry(status, note, lambda c: check(c, False))
        if with_async:
            ENTRIES[f"{qualname}_async"] = Entry(status, note, lambda c: check(c, True))
        return check

    return register


# ServiceClient ---------------------------------------------------------------------------


@entry("ServiceClient.close", SUPPORTED, "finishes the session (`/sessions/{id}/finish`)")
def _(c: Ctx, a: bool) -> None:
    sc = c.server.client(KEY)
    tc = sc.create_lora_training_client(base_model=c.server.model, rank=4).result()
    assert tc.model_id
    assert sc.close("success").result(timeout=30) is None


@entry(
    "ServiceClient.copy_weights",
    SUPPORTED,
    "copies a checkpoint into a new run (needs the client's `project_id`, recorded only)",
)
def _(c: Ctx, a: bool) -> None:
    sc = tinker.ServiceClient(base_url=c.server.base_url, api_key=KEY, project_id="proj-x")
    copied = sc.copy_weights(c.state_path).result()
    assert copied.startswith("tinker://") and copied.endswith("/weights/surface-state")
    assert copied != c.state_path


@entry(
    "ServiceClient.create_custom_loss",
    SUPPORTED,
    "the traced graph is uploaded (`/create_custom_loss`), rebuilt against an allowlist and "
    "stored per session (`custom_loss_server_side` on; `TINKERD_CUSTOM_LOSS_SERVER_SIDE=0` "
    "turns it off and the SDK runs it client-side)",
)
def _(c: Ctx, a: bool) -> None:
    def neg_ll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/neg_ll:sum": loss}

    handle = c.sc.create_custom_loss(neg_ll, input_ranks={"logprobs": 1, "weights": 1}).result()
    tc = c.fresh_tc()
    out = tc.forward_backward_custom([sft_datum(SEQ)], handle).result()
    ce = tc.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    assert out.metrics["loss:sum"] == pytest.approx(ce, rel=1e-4)


@entry("ServiceClient.create_lora_training_client", SUPPORTED, "LoRA adapter", with_async=True)
def _(c: Ctx, a: bool) -> None:
    tc = call(c.sc, "create_lora_training_client", a, base_model=c.server.model, rank=2)
    info = tc.get_info()
    assert info.model_id == tc.model_id and info.lora_rank == 2


@entry("ServiceClient.create_rest_client", SUPPORTED, "deprecated; same as `RestClient()`")
def _(c: Ctx, a: bool) -> None:
    runs = c.sc.create_rest_client().list_training_runs(limit=100).result().training_runs
    assert c.tc.model_id in {r.training_run_id for r in runs}


@entry(
    "ServiceClient.create_sampling_client",
    SUPPORTED,
    "base model or `tinker://` path; `record_stability_info` records each sampled sequence "
    "for `stable_reinforce`",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    assert_samples(call(c.sc, "create_sampling_client", a, base_model=c.server.model))
    from_path = call(c.sc, "create_sampling_client", a, model_path=c.sampler_path)
    assert from_path.get_base_model() == c.server.model
    assert_samples(from_path)


def _from_state(c: Ctx, a: bool, name: str) -> None:
    tc = call(c.sc, name, a, c.state_path)
    assert tc.model_id != c.tc.model_id
    ours = tc.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    theirs = c.tc.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    assert ours == pytest.approx(theirs, rel=1e-5)


@entry(
    "ServiceClient.create_training_client_from_state",
    SUPPORTED,
    "weights only (fresh optimizer); see test_state.py",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    _from_state(c, a, "create_training_client_from_state")


@entry(
    "ServiceClient.create_training_client_from_state_with_optimizer",
    SUPPORTED,
    "weights and Adam moments; see test_state.py",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    _from_state(c, a, "create_training_client_from_state_with_optimizer")


@entry("ServiceClient.get_console_url", CLIENT_ONLY, "a hosted-console URL; no request")
def _(c: Ctx, a: bool) -> None:
    assert c.sc.get_console_url().startswith("https://")


@entry(
    "ServiceClient.get_server_capabilities",
    SUPPORTED,
    "every served model, trainable and sampleable",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    caps = call(c.sc, "get_server_capabilities", a)
    models = {m.model_name: m for m in caps.supported_models}
    assert models[c.server.model].trainable and models[c.server.model].sampleable


def _telemetry(obj: Any) -> None:
    # TINKER_TELEMETRY=0 in the e2e suite; with it on, batches go to /api/v1/telemetry.
    got = obj.get_telemetry()
    assert got is None or hasattr(got, "log")


for _cls in CLASSES:
    entry(
        f"{_cls}.get_telemetry",
        CLIENT_ONLY,
        "the client's telemetry object; `/telemetry` accepts and drops batches",
    )(
        lambda c, a, _cls=_cls: _telemetry(
            {
                "ServiceClient": c.sc,
                "TrainingClient": c.tc,
                "SamplingClient": c.sampler,
                "RestClient": c.rest,
                "AdminClient": c.admin,
            }[_cls]
        )
    )


@entry("ServiceClient.holder", CLIENT_ONLY, "the client's internal holder (property)")
def _(c: Ctx, a: bool) -> None:
    assert c.sc.holder.get_session_id() == c.session_id()


# TrainingClient --------------------------------------------------------------------------


@entry(
    "TrainingClient.create_sampling_client",
    SUPPORTED,
    "sampler from a saved `sampler_weights` path",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    assert_samples(call(c.tc, "create_sampling_client", a, c.sampler_path))


@entry(
    "TrainingClient.forward",
    SUPPORTED,
    "forward-only pass, any supported loss; see test_sft_sampling.py",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    out = call(c.tc, "forward", a, [sft_datum(SEQ)], "cross_entropy")
    lp = out.loss_fn_outputs[0]["logprobs"].tolist()
    assert len(lp) == len(SEQ) - 1 and all(x < 0 for x in lp)
    assert out.metrics["loss:sum"] == pytest.approx(-sum(lp), rel=1e-4)


@entry(
    "TrainingClient.forward_backward",
    SUPPORTED,
    "cross_entropy, importance_sampling, ppo, cispo, dro, gspo, stable_reinforce (datums "
    "with provenance; see test_stable_reinforce.py)",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    tc = c.fresh_tc()
    out = call(tc, "forward_backward", a, [sft_datum(SEQ)], "cross_entropy")
    assert out.metrics["loss:sum"] > 0 and len(out.loss_fn_outputs) == 1
    with pytest.raises(tinker.BadRequestError) as err:
        call(tc, "forward_backward", a, [rl_datum()], "stable_reinforce")
    assert "stable_reinforce needs provenance" in str(err.value)


def rl_datum() -> types.Datum:
    n = len(SEQ) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(SEQ[:-1]),
        loss_fn_inputs={
            "target_tokens": SEQ[1:],
            "logprobs": [0.0] * n,
            "advantages": [1.0] * n,
        },
    )


@entry(
    "TrainingClient.forward_backward_custom",
    SUPPORTED,
    "server-side: one forward_backward of loss_fn `custom`, batched with other tenants "
    "(client-side two-pass path when the switch is off); see test_custom_loss.py",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    def linear(batch, logprobs):
        loss = sum(-(lp * torch.ones_like(lp)).sum() for lp in logprobs)
        return loss, {}

    tc = c.fresh_tc()
    ce = tc.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    out = call(tc, "forward_backward_custom", a, [sft_datum(SEQ)], linear)
    assert out.metrics["loss:sum"] == pytest.approx(ce, rel=1e-4)


@entry("TrainingClient.get_console_url", CLIENT_ONLY, "a hosted-console URL; no request")
def _(c: Ctx, a: bool) -> None:
    assert c.tc.get_console_url().startswith("https://")


@entry("TrainingClient.get_info", SUPPORTED, "model id, rank, tokenizer id", with_async=True)
def _(c: Ctx, a: bool) -> None:
    info = call(c.tc, "get_info", a)
    assert info.model_id == c.tc.model_id and info.lora_rank == 4 and info.is_lora
    assert info.model_data.tokenizer_id


@entry(
    "TrainingClient.get_tokenizer",
    SUPPORTED,
    "loaded client-side from `get_info`'s `tokenizer_id` (a local dir for local models)",
)
def _(c: Ctx, a: bool) -> None:
    tok = c.tc.get_tokenizer()
    assert tok.encode("hello", add_special_tokens=False)


def _legacy_load(c: Ctx, a: bool, name: str) -> None:
    tc = c.fresh_tc()  # the load must be the run's first request
    res = call(tc, name, a, c.state_path)
    assert res.path == c.state_path
    ours = tc.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    theirs = c.tc.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    assert ours == pytest.approx(theirs, rel=1e-5)


@entry(
    "TrainingClient.load_state",
    SUPPORTED,
    "deprecated; only as a run's first request (400 otherwise)",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    _legacy_load(c, a, "load_state")


@entry(
    "TrainingClient.load_state_with_optimizer",
    SUPPORTED,
    "deprecated; only as a run's first request (400 otherwise)",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    _legacy_load(c, a, "load_state_with_optimizer")


@entry(
    "TrainingClient.optim_step",
    SUPPORTED,
    "AdamW (decoupled weight decay, optional grad clipping); DiMuon answers 400",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    tc = c.fresh_tc()
    before = tc.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    tc.forward_backward([sft_datum(SEQ)], "cross_entropy").result()
    out = call(tc, "optim_step", a, adam(5e-2))
    assert out.metrics is None or isinstance(out.metrics, dict)
    after = tc.forward([sft_datum(SEQ)], "cross_entropy").result().metrics["loss:sum"]
    assert after < before


@entry("TrainingClient.save_state", SUPPORTED, "weights + optimizer", with_async=True)
def _(c: Ctx, a: bool) -> None:
    name = f"save-state-{int(a)}"
    path = call(c.tc, "save_state", a, name).path
    assert path == f"tinker://{c.tc.model_id}/weights/{name}"
    assert path in checkpoints_of(c, c.tc.model_id)


@entry(
    "TrainingClient.save_weights_and_get_sampling_client",
    SUPPORTED,
    "`kind=snapshot`: frozen weights; `kind=inflight`: every inflight client of the run "
    "follows its latest inflight save (see test_stable_reinforce.py)",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    assert_samples(call(c.tc, "save_weights_and_get_sampling_client", a))
    assert_samples(call(c.tc, "save_weights_and_get_sampling_client", a, kind="inflight"))


@entry(
    "TrainingClient.save_weights_external",
    SUPPORTED,
    "HF/PEFT export with signed download URLs (age encryption not supported: 400)",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    name = f"external-{int(a)}"
    res = call(c.tc, "save_weights_external", a, name)
    assert res.path == f"tinker://{c.tc.model_id}/external_weights/{name}"


@entry("TrainingClient.save_weights_for_sampler", SUPPORTED, "sampler weights", with_async=True)
def _(c: Ctx, a: bool) -> None:
    name = f"sampler-{int(a)}"
    path = call(c.tc, "save_weights_for_sampler", a, name).path
    assert path == f"tinker://{c.tc.model_id}/sampler_weights/{name}"


# SamplingClient --------------------------------------------------------------------------


@entry(
    "SamplingClient.compute_logprobs",
    SUPPORTED,
    "prompt logprobs (`prompt_logprobs_last_n` too); see test_sampling_extras.py",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    lps = call(c.sampler, "compute_logprobs", a, types.ModelInput.from_ints(PROMPT))
    assert len(lps) == len(PROMPT) and lps[0] is None
    assert all(x is not None and x < 0 for x in lps[1:])


@entry("SamplingClient.create", SUPPORTED, "low-level constructor over a holder")
def _(c: Ctx, a: bool) -> None:
    assert_samples(tinker.SamplingClient.create(c.sc.holder, base_model=c.server.model).result())


@entry(
    "SamplingClient.from_sampler_handle",
    SUPPORTED,
    "rebuilds a client for the same sampling session; its clone id comes from "
    "`/join_sampling_session`",
)
def _(c: Ctx, a: bool) -> None:
    clone = tinker.SamplingClient.from_sampler_handle(c.sampler.get_sampler_handle(), api_key=KEY)
    assert clone.get_base_model() == c.server.model
    assert_samples(clone)
    assert clone._cloned_sampler_id is not None and clone._cloned_sampler_id >= 1


@entry("SamplingClient.get_base_model", SUPPORTED, "from the sampling session", with_async=True)
def _(c: Ctx, a: bool) -> None:
    assert call(c.sampler, "get_base_model", a) == c.server.model


@entry("SamplingClient.get_sampler_handle", CLIENT_ONLY, "a credential-free handle string")
def _(c: Ctx, a: bool) -> None:
    handle = c.sampler.get_sampler_handle()
    assert isinstance(handle, str) and KEY not in handle


@entry(
    "SamplingClient.get_tokenizer",
    SUPPORTED,
    "loaded client-side by base-model name (a path for local models; "
    "`tinkerd tokenizer-cache` for hub names offline)",
)
def _(c: Ctx, a: bool) -> None:
    assert c.sampler.get_tokenizer().encode("hello", add_special_tokens=False)


@entry(
    "SamplingClient.on_queue_state_change",
    CLIENT_ONLY,
    "callback for `try_again` queue states (tinkerd always reports `active`)",
)
def _(c: Ctx, a: bool) -> None:
    from tinker.lib.public_interfaces.sampling_client import QueueState

    assert c.sampler.on_queue_state_change(QueueState.ACTIVE, None) is None


@entry(
    "SamplingClient.sample",
    SUPPORTED,
    "stop strings/ids, seeds, top-k/top-p, prompt/top-k/target logprobs, alt tokens; "
    "`record_stability_info` records sequences; results announced by `/retrieve_futures`, "
    "abandoned "
    "queued samples cancelled (`/cancel_future`)",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    assert_samples(c.sampler, a)


# RestClient / AdminClient ----------------------------------------------------------------


def _hosted(qualname: str, what: str, fn: Callable[[Ctx, bool], Any], with_async=True) -> None:
    entry(
        qualname,
        NOT_SUPPORTED,
        f"hosted-service feature ({what}): 404 '{HOSTED_ONLY}'",
        with_async=with_async,
    )(lambda c, a: assert_hosted_only(lambda: fn(c, a)))


_hosted(
    "RestClient.assign_session_project",
    "projects",
    lambda c, a: call(c.rest, "assign_session_project", a, c.session_id(), "proj"),
)


@entry(
    "RestClient.export_session_trace",
    SUPPORTED,
    "a signed URL (one hour, no API key needed) serving the session's Chrome trace-event "
    "JSON (opens in ui.perfetto.dev): each request with its queue wait and compute, the "
    "micro-batches and sampling batches it shared; `tinker session export-trace` downloads it",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    url = call(c.rest, "export_session_trace", a, c.session_id())
    trace = httpx.get(url, timeout=60).json()
    names = {e["name"] for e in trace["traceEvents"] if "request_id" in e.get("args", {})}
    assert {"create_model", "forward_backward", "optim_step"} <= names, names


_hosted(
    "RestClient.search_sessions",
    "session search",
    lambda c, a: call(c.rest, "search_sessions", a, types.SessionSearchRequest()),
    with_async=False,
)
for _cls in ("RestClient", "AdminClient"):
    _hosted(
        f"{_cls}.get_audit_log",
        "audit log",
        lambda c, a, _cls=_cls: call(getattr(c, _cls[:-6].lower()), "get_audit_log", a),
    )
    _hosted(
        f"{_cls}.get_billing_usage",
        "billing",
        lambda c, a, _cls=_cls: call(
            getattr(c, _cls[:-6].lower()), "get_billing_usage", a, "2025-01-01", "2025-02-01"
        ),
    )
    _hosted(
        f"{_cls}.get_current_checkpoint_storage_usage",
        "billing",
        lambda c, a, _cls=_cls: call(
            getattr(c, _cls[:-6].lower()), "get_current_checkpoint_storage_usage", a
        ),
    )


@entry(
    "RestClient.copy_weights",
    SUPPORTED,
    "into a new run (`destination_project_id` recorded only); see test_rest_surface.py",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    copied = call(c.rest, "copy_weights", a, c.state_path, "proj-x")
    run = copied.removeprefix("tinker://").split("/")[0]
    assert run != c.tc.model_id and copied in checkpoints_of(c, run)


def _delete(c: Ctx, a: bool, by_path: bool) -> None:
    path = c.tc.save_state(f"to-delete-{int(a)}-{int(by_path)}").result().path
    assert path in checkpoints_of(c, c.tc.model_id)
    if by_path:
        call(c.rest, "delete_checkpoint_from_tinker_path", a, path)
    else:
        ckpt = path.split("/", 3)[3]
        call(c.rest, "delete_checkpoint", a, c.tc.model_id, ckpt)
    assert path not in checkpoints_of(c, c.tc.model_id)


@entry("RestClient.delete_checkpoint", SUPPORTED, "removes the files", with_async=True)
def _(c: Ctx, a: bool) -> None:
    _delete(c, a, by_path=False)


@entry("RestClient.delete_checkpoint_from_tinker_path", SUPPORTED, "", with_async=True)
def _(c: Ctx, a: bool) -> None:
    _delete(c, a, by_path=True)


@entry(
    "RestClient.get_external_weights_urls",
    SUPPORTED,
    "signed URLs served by tinkerd (`/api/v1/downloads/...`); see test_rest_surface.py",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    res = call(c.rest, "get_external_weights_urls", a, c.external_path)
    assert res.urls and all(u.startswith(c.server.base_url) for u in res.urls.values())


@entry("RestClient.get_sampler", SUPPORTED, "", with_async=True)
def _(c: Ctx, a: bool) -> None:
    sid = c.rest.get_session(c.session_id()).result().sampler_ids[0]
    res = call(c.rest, "get_sampler", a, sid)
    assert res.sampler_id == sid and res.base_model == c.server.model


@entry("RestClient.get_server_capabilities", SUPPORTED, "")
def _(c: Ctx, a: bool) -> None:
    caps = c.rest.get_server_capabilities().result()
    assert c.server.model in {m.model_name for m in caps.supported_models}


@entry("RestClient.get_session", SUPPORTED, "its runs and samplers", with_async=True)
def _(c: Ctx, a: bool) -> None:
    res = call(c.rest, "get_session", a, c.session_id())
    assert c.tc.model_id in res.training_run_ids and res.sampler_ids


@entry("RestClient.get_training_run", SUPPORTED, "", with_async=True)
def _(c: Ctx, a: bool) -> None:
    run = call(c.rest, "get_training_run", a, c.tc.model_id)
    assert run.training_run_id == c.tc.model_id and run.lora_rank == 4
    assert run.base_model == c.server.model


@entry("RestClient.get_training_run_by_tinker_path", SUPPORTED, "", with_async=True)
def _(c: Ctx, a: bool) -> None:
    run = call(c.rest, "get_training_run_by_tinker_path", a, c.state_path)
    assert run.training_run_id == c.tc.model_id


@entry("RestClient.get_weights_info_by_tinker_path", SUPPORTED, "")
def _(c: Ctx, a: bool) -> None:
    info = c.rest.get_weights_info_by_tinker_path(c.state_path).result()
    assert info.base_model == c.server.model and info.is_lora and info.lora_rank == 4


@entry("RestClient.list_checkpoints", SUPPORTED, "", with_async=True)
def _(c: Ctx, a: bool) -> None:
    res = call(c.rest, "list_checkpoints", a, c.tc.model_id)
    kinds = {ck.tinker_path: ck.checkpoint_type for ck in res.checkpoints}
    assert kinds[c.state_path] == "training" and kinds[c.sampler_path] == "sampler"


@entry("RestClient.list_sessions", SUPPORTED, "", with_async=True)
def _(c: Ctx, a: bool) -> None:
    assert c.session_id() in call(c.rest, "list_sessions", a, limit=100).sessions


@entry("RestClient.list_training_runs", SUPPORTED, "paged", with_async=True)
def _(c: Ctx, a: bool) -> None:
    res = call(c.rest, "list_training_runs", a, limit=100)
    assert c.tc.model_id in {r.training_run_id for r in res.training_runs}


@entry("RestClient.list_user_checkpoints", SUPPORTED, "paged", with_async=True)
def _(c: Ctx, a: bool) -> None:
    paths = {ck.tinker_path for ck in call(c.rest, "list_user_checkpoints", a).checkpoints}
    assert {c.state_path, c.sampler_path} <= paths


def _publish(c: Ctx, a: bool, name: str, public: bool) -> None:
    path = c.tc.save_state(f"{name}-{int(a)}").result().path
    if not public:
        c.rest.publish_checkpoint_from_tinker_path(path).result()
    call(c.rest, name, a, path)
    assert checkpoints_of(c, c.tc.model_id)[path].public is public


@entry(
    "RestClient.publish_checkpoint_from_tinker_path",
    SUPPORTED,
    "other users may load it; see test_rest_surface.py",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    _publish(c, a, "publish_checkpoint_from_tinker_path", True)


@entry("RestClient.unpublish_checkpoint_from_tinker_path", SUPPORTED, "", with_async=True)
def _(c: Ctx, a: bool) -> None:
    _publish(c, a, "unpublish_checkpoint_from_tinker_path", False)


@entry(
    "RestClient.set_checkpoint_ttl_from_tinker_path",
    SUPPORTED,
    "expired checkpoints are deleted",
    with_async=True,
)
def _(c: Ctx, a: bool) -> None:
    path = c.tc.save_state(f"ttl-{int(a)}").result().path
    call(c.rest, "set_checkpoint_ttl_from_tinker_path", a, path, 3600)
    assert checkpoints_of(c, c.tc.model_id)[path].expires_at is not None


@entry(
    "RestClient.whoami",
    NOT_SUPPORTED,
    "client-side decode of a JWT; tinkerd uses plain `tml-` keys (`pjwt_auth_enabled` off)",
)
def _(c: Ctx, a: bool) -> None:
    with pytest.raises(RuntimeError, match="whoami requires JWT auth"):
        c.rest.whoami().result()


# -- the tests -------------------------------------------------------------------------------


def test_every_public_method_has_an_entry() -> None:
    methods = public_methods()
    missing = sorted(set(methods) - set(ENTRIES))
    stale = sorted(set(ENTRIES) - set(methods))
    assert not missing, f"public SDK methods without an entry in test_sdk_surface.py: {missing}"
    assert not stale, f"entries for methods the SDK no longer has: {stale}"


@pytest.mark.parametrize("qualname", sorted(ENTRIES))
def test_method_against_live_server(qualname: str, ctx: Ctx) -> None:
    ENTRIES[qualname].check(ctx)


def test_custom_loss_server_side_is_announced(server) -> None:
    """Server-side custom losses are on by default (tests/e2e/test_custom_loss.py drives them
    with the SDK, and with the switch off)."""
    config = httpx.post(f"{server.base_url}/api/v1/client/config", json={}).json()
    assert config["custom_loss_server_side"] is True


SAMPLING_FLAGS = ("sample_use_retrieve_futures", "sample_join_sampling_session")


def test_sampling_flags_are_on(server) -> None:
    """The optional sampling endpoints are served and announced (tests/e2e/
    test_sampling_queue.py drives them with the SDK, and with the flags off)."""
    config = httpx.post(f"{server.base_url}/api/v1/client/config", json={}).json()
    dynamic = httpx.post(f"{server.base_url}/api/v1/client/dynamic_config", json={}).json()
    assert all(config[flag] is True for flag in SAMPLING_FLAGS)
    assert dynamic["sample_cancel_enabled"] is True


# -- COMPAT.md ------------------------------------------------------------------------------

RECIPES = [
    "recipes.sl_loop",
    "recipes.rl_loop",
    "recipes.sl_basic",
    "recipes.rl_basic",
    "recipes.chat_sl.train",
    "recipes.math_rl.train",
    "recipes.code_rl.train",
    "recipes.preference.dpo.train",
    "recipes.preference.rlhf.rlhf_pipeline",
    "recipes.preference.shorter.train",
    "recipes.distillation.on_policy_distillation",
    "recipes.distillation.on_policy_multi_teacher",
    "recipes.distillation.off_policy_reasoning",
    "recipes.distillation.on_policy_distillation_harbor_multi_turn",
    "recipes.prompt_distillation",
    "recipes.rubric.train",
    "recipes.rubric.prometheus_experimental",
    "recipes.multiplayer_rl.guess_number.train",
    "recipes.multiplayer_rl.twenty_questions.train",
    "recipes.multiplayer_rl.text_arena.train",
    "recipes.search_tool.train",
    "recipes.verifiers_rl.train",
    "recipes.harbor_rl.train",
    "recipes.vlm_classifier.train",
    "recipes.audio",
    "recipes.forecasting.train",
    "recipes.decisions",
    "recipes.sdft.train",
]

FEATURES = [
    ("loss `cross_entropy` (1-D and 2-D soft targets)", SUPPORTED, ""),
    ("losses `importance_sampling`, `ppo`, `cispo`, `dro`, `gspo`", SUPPORTED, ""),
    (
        "loss `stable_reinforce`",
        SUPPORTED,
        "tinkerd's own objective (hosted Tinker's math is unpublished): REINFORCE weighted by "
        "the truncated ratio to the server-recorded behaviour logprobs, with token- and "
        "sequence-level masking of drifted (stale) data; provenance checked against the "
        "session's sequence records (docs/api.md, 'stable_reinforce'). The cookbook's RL recipes "
        "run at their defaults (tests/conformance/test_rl_defaults.py)",
    ),
    (
        "`record_stability_info` (sequence records)",
        SUPPORTED,
        "prompt, sampled tokens, behaviour and temperature-1 logprobs, weights (run, optim "
        "step) per sequence; session-scoped, one day after last use, survive restarts, "
        "bounded by `TINKERD_STABILITY_RECORDS_MAX_MB` (least recently used deleted first)",
    ),
    (
        'inflight sampling clients (`kind="inflight"`)',
        SUPPORTED,
        "one mutable target per training run, updated by each inflight save for existing and "
        "new inflight clients; snapshot clients keep their weights",
    ),
    (
        "server-side custom losses (`custom`, `/create_custom_loss`)",
        SUPPORTED,
        "`custom_loss_server_side` on: the torch.fx graph (JSON, never pickled) is rebuilt "
        "against an allowlist of torch/math/operator functions and tensor methods, sizes "
        "checked on meta tensors before anything is allocated, stored per session (survives "
        "restarts), and run in the same batched pass as other tenants (docs/api.md, 'Server-side "
        "custom losses'). `TINKERD_CUSTOM_LOSS_SERVER_SIDE=0` turns it off",
    ),
    (
        "`/retrieve_futures` (`sample_use_retrieve_futures`)",
        SUPPORTED,
        "flag on (`TINKERD_SAMPLE_USE_RETRIEVE_FUTURES=0` turns it off: one `/retrieve_future` "
        "long-poll per sample). Each sampling client long-polls its session's completion "
        "queue; the cursor is a place in that queue stored with each future, so it stays valid "
        "across restarts; a fresh poller starts after what its client acknowledged. "
        "`retrieved_request_ids` is ignored (results stay stored); see test_sampling_queue.py",
    ),
    (
        "`/cancel_future` (`sample_cancel_enabled`)",
        SUPPORTED,
        "flag on (`TINKERD_SAMPLE_CANCEL_ENABLED=0`: abandoned samples run to completion). A "
        "queued sample is removed and its future fails (category `user`, 'cancelled'); a "
        "running or finished one is left alone (200); training requests answer 400",
    ),
    (
        "`/join_sampling_session` (`sample_join_sampling_session`)",
        SUPPORTED,
        "flag on (`TINKERD_SAMPLE_JOIN_SAMPLING_SESSION=0`: unpickled clients pick random "
        "clone ids). Clone ids are stored, never handed out twice, and above every seq_id "
        "block the session has used",
    ),
    (
        "OpenAI-compatible inference (`/oai/api/v1/chat/completions`, `/completions`, `/models`)",
        SUPPORTED,
        "`model`: base name, `tinker://` path or `<base>;<path>`; the model's chat template; "
        "streaming (SSE, token by token), n, seed, stop, logprobs, usage; "
        "same keys and isolation (Bearer or `x-api-key`); tests/e2e/test_inference_api.py",
    ),
    (
        "Anthropic-compatible inference (`/anthropic/api/v1/messages`, `/count_tokens`)",
        SUPPORTED,
        "as OpenAI's: text content, system prompts, streaming events, stop sequences; tools "
        "and images are refused with a 400",
    ),
    (
        "image input (`ImageChunk` in `forward`/`forward_backward`, `sample`, `compute_logprobs`)",
        SUPPORTED,
        "Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE); `expected_tokens` checked against the model's "
        'image processor ("Expected N tokens, got M from image"); png/jpeg, 20 MiB, 25 MP; '
        "other models, `ImageAssetPointerChunk` and audio answer 400; "
        "tests/e2e/test_vision_input.py",
    ),
    ("JWT auth (`pjwt_auth_enabled`)", NOT_SUPPORTED, "plain `tml-` API keys, one user per key"),
]


def render_compat_md() -> str:
    counts = {s: 0 for s in (SUPPORTED, CLIENT_ONLY, NOT_SUPPORTED)}
    for e in ENTRIES.values():
        counts[e.status] += 1
    lines = [
        "# tinkerd compatibility with tinker 0.38.0",
        "",
        "<!-- Generated by tests/e2e/test_sdk_surface.py; do not edit by hand. Regenerate with",
        "     TINKERD_WRITE_COMPAT=1 .venv/bin/pytest tests/e2e/test_sdk_surface.py -->",
        "",
        "Every public method of `ServiceClient`, `TrainingClient`, `SamplingClient`,",
        "`RestClient` and `AdminClient` (`*_async` variants included), each called against a",
        "live tinkerd by `tests/e2e/test_sdk_surface.py`. *client-side* methods send no request",
        "of their own (or only ones covered by other rows).",
        "",
        f"**{len(ENTRIES)} methods: {counts[SUPPORTED]} supported, {counts[CLIENT_ONLY]} "
        f"client-side, {counts[NOT_SUPPORTED]} not supported.**",
        "",
        "## SDK methods",
        "",
        "| method | status | notes |",
        "| --- | --- | --- |",
    ]
    for name in sorted(ENTRIES):
        e = ENTRIES[name]
        lines.append(f"| `{name}` | {e.status} | {e.note} |")
    lines += ["", "## Features and server-side options", "", "| feature | status | notes |"]
    lines += ["| --- | --- | --- |"]
    lines += [f"| {f} | {s} | {n} |" for f, s, n in FEATURES]
    lines += [
        "",
        "## Cookbook recipes (tinker-cookbook 0.6.1)",
        "",
        "<!-- PLACEHOLDER: filled in from tests/conformance (see",
        "     shared/docs/cookbook-conformance.md); statuses below are not yet measured. -->",
        "",
        "| recipe | status |",
        "| --- | --- |",
    ]
    lines += [f"| `tinker_cookbook.{r}` | not yet run (see tests/conformance) |" for r in RECIPES]
    return "\n".join(lines) + "\n"


RECIPES_HEADING = "## Cookbook recipes"


def test_compat_md_is_up_to_date() -> None:
    """The generated part (everything before the recipes section) must match; the recipes
    section belongs to tests/conformance and is kept as it is when rewriting."""
    text = render_compat_md()
    generated = text[: text.index(RECIPES_HEADING)]
    current = COMPAT_MD.read_text() if COMPAT_MD.exists() else ""
    if os.environ.get("TINKERD_WRITE_COMPAT") == "1":
        recipes = current[current.index(RECIPES_HEADING) :] if RECIPES_HEADING in current else ""
        COMPAT_MD.write_text(generated + (recipes or text[len(generated) :]))
        return
    assert current[: len(generated)] == generated and RECIPES_HEADING in current, (
        "COMPAT.md is out of date: run TINKERD_WRITE_COMPAT=1 .venv/bin/pytest "
        "tests/e2e/test_sdk_surface.py"
    )
