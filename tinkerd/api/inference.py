"""The shared core of the OpenAI- and Anthropic-compatible endpoints (hosted Tinker offers both).

Both APIs come down to the same steps, done here once: resolve `model` (a served base model, a
`tinker://` checkpoint the caller may read, or `<base>;<path>`), render the prompt (the model's
own chat template, or text / token ids for legacy completions), queue a `Sample` op on the base
model's scheduler, so these requests join the same sampling batches as the SDK's samples, and
await it from asyncio. The sequences come back as `Choice`s: per-token text pieces with EOS and
the matched stop string removed, which each API shapes into its response or its SSE events.

Streamed responses are token by token: `stream` sets the sample's `on_token` hook, which the
sampler calls on the scheduler thread as each token is drawn; the tokens cross into asyncio
(`call_soon_threadsafe` into a queue) and `IncrementalText` turns each sequence's tokens into
text deltas as soon as that text is final (never half a UTF-8 character, never text that may
still turn out to be the start of a stop string, never EOS, nothing after a matched stop
string). When the sample is done, the rest of each sequence's text is reconciled with
`to_choice`, so the deltas add up to exactly the non-streamed text. Keep-alives go out while
nothing else does (queued behind other batches, or a slow prefill). Samples join whole
batches, which run to their end: a stream starts when its batch does.
"""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict

from tinkerd.api import auth
from tinkerd.api.service import ApiError, Service
from tinkerd.checkpoints.paths import SCHEME, TinkerPath
from tinkerd.checkpoints.peft_format import read_adapter_info
from tinkerd.engine.ops import Op, Sample, UserError
from tinkerd.engine.scheduler import ModelScheduler
from tinkerd.model.loading import BaseModelInfo
from tinkerd.model.sampling import Choice as Drawn
from tinkerd.model.sampling import validate_sample_input
from tinkerd.model.types import SampledSequence, SampleInput, SampleOutput, SamplingParams

# Chat requests without max_tokens get what the context leaves, up to this: the sampler runs a
# batch to its end, so an unbounded default would hold every tenant's samples behind it.
DEFAULT_CHAT_MAX_TOKENS = 1024
# A streamed response sends a keep-alive when it has sent nothing else for this long.
KEEPALIVE_SECONDS = 10.0
# Token events decoded in one go on the event loop; more go to a worker thread.
DECODE_ON_LOOP = 16
# Checkpoint kinds that can be sampled (external_weights are exports for other tools).
SAMPLEABLE_KINDS = ("sampler_weights", "weights")

T = TypeVar("T")
log = logging.getLogger(__name__)


class InferenceError(Exception):
    """A caller error (or a failed sample): HTTP `status`, what is wrong, and the request field
    it concerns (`param`); each API renders it in its own error shape."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


# -- auth and errors ---------------------------------------------------------------------------


def inference_user(
    request: Request,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """The caller's user id: the Tinker API keys and rule (auth.py), sent as `x-api-key`
    (Anthropic clients) or `Authorization: Bearer` (OpenAI clients)."""
    key = x_api_key or auth.bearer_key(authorization)
    if not key:
        raise InferenceError(
            401, "missing API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`"
        )
    try:
        return auth.authenticator(request.app.state).user(key)
    except auth.AuthError as exc:
        raise InferenceError(401, str(exc)) from exc


def service_of(request: Request) -> Service:
    return request.app.state.service


def validation_error(exc: RequestValidationError) -> InferenceError:
    """A request that breaks the schema, as a 400 naming the fields and problems (both APIs
    answer invalid requests with 400, not FastAPI's 422)."""
    problems, params = [], []
    for error in exc.errors():
        loc = [p for p in error.get("loc", ()) if p != "body"]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if error.get("type") == "json_invalid":
            param = ""
        params.append(param)
        where = param or ("request body" if error.get("type") != "json_invalid" else "")
        problems.append(f"{where}: {error.get('msg', '')}" if where else str(error.get("msg")))
    message = "; ".join(dict.fromkeys(problems)) or "invalid request body"
    return InferenceError(400, message, params[0] if params and params[0] else None)


def error_shaped_route(render: Callable[[InferenceError], Response]) -> type[APIRoute]:
    """A route class whose caller errors (schema, auth, model, input) are answered by `render`
    in its API's error shape instead of the Tinker API's `{"detail": ...}`."""

    class ErrorShapedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            handler = super().get_route_handler()

            async def shaped(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    return render(validation_error(exc))
                except ApiError as exc:
                    return render(InferenceError(exc.status, exc.message))
                except InferenceError as exc:
                    return render(exc)

            return shaped

    return ErrorShapedRoute


# -- models --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """What a request's `model` names: a served base model, and the checkpoint to sample with
    (None: the base model itself)."""

    name: str  # as the caller wrote it; echoed back in responses
    scheduler: ModelScheduler
    adapter_id: str | None = None
    snapshot_dir: Path | None = None

    @property
    def info(self) -> BaseModelInfo:
        return self.scheduler.worker.info

    @property
    def tokenizer(self) -> Any:
        return self.scheduler.worker.base.tokenizer


def resolve_model(service: Service, user: str, model: str) -> Model:
    """`<base>`, `tinker://<run>/sampler_weights/<name>` (or `weights/`), or `<base>;<path>`.
    Checkpoints are the user's own or public ones: another user's answers the same 404 as a
    missing one (`Service.resolve_checkpoint`)."""
    base, sep, path = model.partition(";")
    if not sep and model.startswith(SCHEME):
        base, path = "", model
    base, path = base.strip(), path.strip()
    if sep and not (base and path):
        raise InferenceError(400, f"model {model!r}: write `<base model>;<tinker path>`", "model")
    scheduler = _scheduler(service, base) if base else None
    if not path:
        assert scheduler is not None
        return Model(model, scheduler)
    try:
        tpath = TinkerPath.parse(path)
    except ValueError as exc:
        raise InferenceError(400, f"model: {exc}", "model") from exc
    if tpath.kind not in SAMPLEABLE_KINDS:
        raise InferenceError(
            400, f"model: {path!r} is a {tpath.kind} checkpoint; use sampler_weights or weights"
        )
    try:
        service.resolve_checkpoint(user, path)
    except ApiError as exc:
        raise _model_error(exc) from exc
    snapshot_dir = tpath.storage_dir(service.checkpoint_root)
    try:
        trained_on = read_adapter_info(snapshot_dir).base_model
    except (OSError, ValueError) as exc:
        raise InferenceError(404, f"checkpoint {path!r} not found", "model") from exc
    if scheduler is None:
        scheduler = _scheduler(service, trained_on)
    elif scheduler.worker.info.name != trained_on:
        raise InferenceError(
            400, f"model: checkpoint {path!r} was trained on {trained_on!r}, not {base!r}", "model"
        )
    return Model(model, scheduler, str(tpath), snapshot_dir)


def _scheduler(service: Service, base_model: str) -> ModelScheduler:
    if base_model not in service.schedulers:
        served = ", ".join(service.schedulers)
        raise InferenceError(
            404,
            f"model {base_model!r} is not served here; served: {served} (or a tinker:// "
            "checkpoint path of theirs)",
            "model",
            "model_not_found",
        )
    return service.scheduler(base_model)


def _model_error(exc: ApiError) -> InferenceError:
    code = "model_not_found" if exc.status == 404 else None
    return InferenceError(exc.status, exc.message, "model", code)


# -- prompts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One chat turn, text only (images and tool calls are refused at the edge)."""

    role: Literal["system", "user", "assistant"]
    content: str


def chat_prompt(model: Model, messages: Sequence[Message], prefill: str = "") -> list[int]:
    """The conversation rendered by the model's own chat template, ending with the generation
    prompt of an assistant turn, plus `prefill` (text the answer is to continue, Anthropic's
    final assistant message)."""
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise InferenceError(
            400,
            f"model {model.info.name!r} has no chat template, so it cannot take chat messages; "
            "send a plain prompt to the completions endpoint instead",
            "model",
        )
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
    except TemplateError as exc:
        raise InferenceError(
            400, f"messages: the model's chat template refused them: {exc}", "messages"
        ) from exc
    return tokenizer.encode(str(text) + prefill, add_special_tokens=False)


def text_prompt(model: Model, prompt: str | Sequence[int]) -> list[int]:
    """A completions prompt: text (tokenized as the model's tokenizer does by default) or
    token ids as given."""
    if isinstance(prompt, str):
        return model.tokenizer.encode(prompt, add_special_tokens=True)
    return list(prompt)


def count_prompt_tokens(model: Model, messages: Sequence[Message], prefill: str = "") -> int:
    return len(chat_prompt(model, messages, prefill))


# -- sampling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """Sampling settings common to both APIs (types and ranges checked at the edge)."""

    max_tokens: int | None = None  # None: what the context leaves, up to the API's default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()  # besides EOS, which always stops
    seed: int | None = None
    n: int = 1
    top_logprobs: int = 0  # top-K alternatives per sampled token


def sample_input(
    model: Model,
    prompt: list[int],
    gen: Generation,
    *,
    default_max_tokens: int,
    prompt_field: str,
    max_tokens_field: str = "max_tokens",
) -> SampleInput:
    """The engine's request, checked against the model (context, vocab) before it is queued,
    so a bad request fails alone and never joins a batch. Error messages name this API's
    fields (`prompt_field`, `max_tokens_field`)."""
    context = model.info.context_length
    room = context - len(prompt)
    if room < 1:
        raise InferenceError(
            400,
            f"{prompt_field}: the prompt has {len(prompt)} tokens; the model's context is "
            f"{context} tokens",
            prompt_field,
        )
    max_tokens = gen.max_tokens if gen.max_tokens is not None else min(default_max_tokens, room)
    if max_tokens > room:
        raise InferenceError(
            400,
            f"{max_tokens_field}: the prompt ({len(prompt)} tokens) + {max_tokens_field} "
            f"({max_tokens}) exceeds the model's context of {context} tokens",
            max_tokens_field,
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        stop=gen.stop or None,
        seed=gen.seed,
    )
    item = SampleInput(
        model.adapter_id, prompt, params, num_samples=gen.n, topk_sample_logprobs=gen.top_logprobs
    )
    try:
        validate_sample_input(item, model.info.vocab_size, context)
    except ValueError as exc:
        raise InferenceError(400, str(exc), prompt_field) from exc
    return item


async def generate(model: Model, items: Sequence[SampleInput]) -> list[SampleOutput]:
    """Queue one `Sample` op per item on the model's scheduler, where they join the next
    sampling batch with every other client's samples, and wait for all of them. Callbacks run
    on the scheduler thread, hence `call_soon_threadsafe`. If the caller goes away, ops that
    have not started are taken out of the queue."""
    loop = asyncio.get_running_loop()
    ops: list[Op] = []
    waits: list[asyncio.Future[Any]] = []
    for item in items:
        waiter: asyncio.Future[Any] = loop.create_future()
        op = Op(
            f"inference-{uuid.uuid4().hex}",
            Sample(item, model.snapshot_dir),
            _settle(loop, waiter, ok=True),
            _settle(loop, waiter, ok=False),
        )
        ops.append(op)
        waits.append(waiter)
        model.scheduler.submit(op)
    try:
        results = await asyncio.gather(*waits, return_exceptions=True)
    except asyncio.CancelledError:
        for op in ops:
            model.scheduler.cancel_sample(op.request_id)
        raise
    outputs: list[SampleOutput] = []
    for result in results:
        if isinstance(result, UserError | ValueError):
            raise InferenceError(400, str(result), "model")
        if isinstance(result, BaseException):
            raise InferenceError(500, f"sampling failed: {result}", code="server_error")
        outputs.append(result)
    return outputs


def _settle(
    loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Any], *, ok: bool
) -> Callable[[Any], None]:
    def settle(value: Any) -> None:
        def apply() -> None:
            if waiter.done():
                return
            if ok:
                waiter.set_result(value)
            else:
                waiter.set_exception(value)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(apply)

    return settle


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One sampled token of the output and the text it adds ("" while a multi-byte character
    is incomplete: the next piece carries it)."""

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, float], ...]  # top-K (id, logprob), when asked for


@dataclass(frozen=True)
class Choice:
    """One sampled sequence as an API answer: its text without EOS and without the stop
    string that ended it, the tokens that make that text, and why it ended."""

    text: str
    pieces: tuple[Piece, ...]
    finish: Literal["stop", "length"]
    stop_sequence: str | None  # the stop string that ended it (None: EOS or length)
    generated_tokens: int  # every sampled token, EOS included (usage)


def to_choice(model: Model, seq: SampledSequence, stop: Sequence[str]) -> Choice:
    tokenizer = model.tokenizer
    tokens = list(seq.tokens)
    eos = seq.stop_reason == "stop" and bool(tokens) and tokens[-1] in model.info.eos_token_ids
    body = tokens[:-1] if eos else tokens
    full = tokenizer.decode(body)
    # Where each token's text ends in `full`; a prefix that ends in the middle of a character
    # (U+FFFD) or does not line up with the whole text gives its text to the next token.
    ends, end = [], 0
    for i in range(len(body)):
        if i == len(body) - 1:
            end = len(full)
        else:
            prefix = tokenizer.decode(body[: i + 1])
            if not prefix.endswith("\ufffd") and full.startswith(prefix):
                end = max(end, len(prefix))
        ends.append(end)
    cut, matched = len(full), None
    if seq.stop_reason == "stop" and not eos and stop:
        found = [(full.find(s), s) for s in stop if s in full]
        if found:
            cut, matched = min(found)
    pieces, start = [], 0
    for i, token in enumerate(body):
        if matched is not None and start >= cut:
            break  # the stop string and what followed it in its last token
        top = tuple(seq.topk_logprobs[i]) if seq.topk_logprobs else ()
        pieces.append(Piece(token, full[start : min(ends[i], cut)], seq.logprobs[i], top))
        start = ends[i]
    return Choice(
        text=full[:cut],
        pieces=tuple(pieces),
        finish="stop" if seq.stop_reason == "stop" else "length",
        stop_sequence=matched,
        generated_tokens=len(tokens),
    )


async def choices(
    model: Model, outputs: Sequence[SampleOutput], stop: Sequence[str]
) -> list[Choice]:
    """Every sequence of `outputs`, in order, as a Choice (decoding runs off the event loop)."""

    def build() -> list[Choice]:
        return [to_choice(model, seq, stop) for out in outputs for seq in out.sequences]

    return await asyncio.to_thread(build)


def token_text(model: Model, token: int) -> str:
    return model.tokenizer.decode([token])


def token_bytes(model: Model, token: int) -> list[int]:
    """A token's own bytes: exact for byte-level BPE vocabularies (GPT-2 style, as SmolLM2's),
    where a token may be part of a character; else the UTF-8 of its text."""
    tokenizer = model.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
        piece = tokenizer.convert_ids_to_tokens(token)
        table = _byte_level_decoder()
        if isinstance(piece, str) and all(c in table for c in piece):
            return [table[c] for c in piece]
    return list(token_text(model, token).encode("utf-8"))


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's reversible map of printable characters back to bytes (what ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


# -- streaming -----------------------------------------------------------------------------


async def wait_with_keepalive(
    work: Awaitable[T], keepalive: str
) -> AsyncIterator[tuple[str | None, T | None]]:
    """Run `work`, yielding `(keepalive, None)` every KEEPALIVE_SECONDS until it is done, then
    `(None, result)`. If the stream is closed first (the client left), `work` is cancelled."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=KEEPALIVE_SECONDS)
            if done:
                break
            yield keepalive, None
        yield None, task.result()
    finally:
        if not task.done():
            task.cancel()


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class CompatRequest(BaseModel):
    """Base of the OpenAI/Anthropic request schemas: unknown fields are ignored (the real APIs
    have many optional ones); NaN/inf are refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def compat_router(prefix: str, tag: str, render: Callable[[InferenceError], Response]) -> APIRouter:
    """A router for another API's routes, its errors in that API's shape.

    Not in /openapi.json: that schema describes the Tinker API and its `{"detail"}` errors
    (tests/e2e/test_fuzz.py checks every operation in it for that shape); these routes follow
    another API's spec and error shape, fuzzed in tests/e2e/test_inference_api.py."""
    return APIRouter(
        prefix=prefix,
        tags=[tag],
        include_in_schema=False,
        route_class=error_shaped_route(render),
    )
