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
from typing import Annotated, Any, Literal

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
from tinkerd.engine.replicas import Scheduler
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
    scheduler: Scheduler
    adapter_id: str | None = None
    snapshot_dir: Path | None = None

    @property
    def info(self) -> BaseModelInfo:
        return self.scheduler.front.info

    @property
    def tokenizer(self) -> Any:
        return self.scheduler.front.tokenizer


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
    elif scheduler.front.info.name != trained_on:
        raise InferenceError(
            400, f"model: checkpoint {path!r} was trained on {trained_on!r}, not {base!r}", "model"
        )
    return Model(model, scheduler, str(tpath), snapshot_dir)


def _scheduler(service: Service, base_model: str) -> Scheduler:
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
    except (TemplateError, ValueError) as exc:  # ValueError: e.g. no messages left
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
        if isinstance(result, BaseException):
            raise _failure(result)
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


@dataclass(frozen=True)
class TextDelta:
    """Newly final text of one streamed sequence. `index`: the choice (prompt × n + sample);
    `pieces`: the tokens whose text starts in this delta, with their logprobs (text: each
    token's share of it), `offset` the text offset of the first of them in the sequence."""

    index: int
    text: str
    pieces: tuple[Piece, ...] = ()
    offset: int = 0


@dataclass(frozen=True)
class Finished:
    """The end of a stream: every sequence as a Choice (the non-streamed answer), in order."""

    choices: list[Choice]


class IncrementalText:
    """One sequence's text as its tokens arrive, sent only once it is final.

    `push` takes each sampled token and returns the text that has become final since the last
    delta, if any: the decode of the tokens so far, less a trailing incomplete UTF-8 character
    (U+FFFD at the end of the decode), less an EOS token at the end, less any suffix that is
    the start of a stop string, and cut at the first stop string matched (after which it sends
    nothing). Each token's logprobs go with the delta where its text starts (a token with no
    text of its own, such as the first bytes of a character, goes with the delta that carries
    that character); tokens whose text never goes out (EOS, the stop string) have none, as in
    `to_choice`. `finish` reconciles with the non-streamed Choice: the deltas then add up to
    exactly its text. The whole text is decoded at each token, as `to_choice` decodes every
    prefix, so tokenizers whose decode is not a concatenation of tokens are right too.
    """

    def __init__(
        self, tokenizer: Any, eos_ids: Collection[int], stop: Sequence[str], index: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.stop = tuple(s for s in stop if s)
        self.index = index
        self.tokens: list[int] = []
        self.sent = ""  # the text sent so far
        self.stopped = False  # a stop string was matched: nothing more until `finish`
        self._end = 0  # where the text of the tokens so far ends (as `to_choice`'s ends)
        self._pending: list[Piece] = []  # tokens whose logprobs have not gone out yet
        self._starts: list[int] = []  # ... and where the text of each starts
        self._sent_tokens = 0

    def push(
        self, token: int, logprob: float = 0.0, top: Sequence[tuple[int, float]] = ()
    ) -> TextDelta | None:
        self.tokens.append(token)
        if self.stopped:
            return None
        self._pending.append(Piece(token, "", logprob, tuple(top)))
        self._starts.append(self._end)
        body = self.tokens[:-1] if token in self.eos_ids else self.tokens
        raw = self.tokenizer.decode(body)
        text = raw.rstrip("\ufffd")
        if text == raw:
            self._end = max(self._end, len(text))
        found = [(text.find(s), s) for s in self.stop if s in text]
        if found:
            self.stopped = True
            return self._emit(text[: min(found)[0]])
        return self._emit(text[: len(text) - self._held(text)])

    def _held(self, text: str) -> int:
        """The longest suffix of `text` that a stop string starts with."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _emit(self, target: str) -> TextDelta | None:
        if len(target) <= len(self.sent) or not target.startswith(self.sent):
            return None  # nothing new is final (or it does not extend what went out: wait)
        before, self.sent = len(self.sent), target
        count = sum(1 for start in self._starts if start < len(target))
        starts = [*self._starts[:count], len(target)]
        pieces = tuple(
            dataclasses.replace(p, text=target[starts[j] : starts[j + 1]])
            for j, p in enumerate(self._pending[:count])
        )
        offset = starts[0] if count else before
        del self._pending[:count], self._starts[:count]
        self._sent_tokens += count
        return TextDelta(self.index, target[before:], pieces, offset)

    def finish(self, choice: Choice) -> TextDelta | None:
        """What is left of `choice` (the same sequence, as `to_choice` made it): its text
        after what was sent, with the logprobs of its tokens not sent yet."""
        if not choice.text.startswith(self.sent):
            log.warning(
                "streamed text of choice %d does not lead to its final text; the stream "
                "sends no more of it (sent %r, final %r)",
                self.index,
                self.sent[-40:],
                choice.text[: len(self.sent) + 40][-80:],
            )
            return None
        rest = choice.text[len(self.sent) :]
        pieces = choice.pieces[self._sent_tokens :]
        offset = sum(len(p.text) for p in choice.pieces[: self._sent_tokens])
        self.sent, self.stopped = choice.text, True
        self._pending, self._starts = [], []
        self._sent_tokens = max(self._sent_tokens, len(choice.pieces))
        if not rest and not pieces:
            return None
        return TextDelta(self.index, rest, tuple(pieces), offset)


async def stream(
    model: Model, items: Sequence[SampleInput], stop: Sequence[str]
) -> AsyncIterator[TextDelta | Finished | None]:
    """`generate`, token by token: queue one `Sample` op per item with an `on_token` hook and
    yield each sequence's `TextDelta`s as its tokens are drawn (choices numbered item × n +
    sample, interleaved as they come), then `Finished` with every Choice once all are done.
    Yields None when nothing else has gone out for KEEPALIVE_SECONDS (send a keep-alive).
    Raises InferenceError when a sample fails. If the stream is closed first (the client
    left), its ops are cancelled: queued ones leave the queue, decoding ones leave the decode
    batch at the next step (tokens drawn meanwhile are dropped at the hook)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
    gone = threading.Event()  # read by the hooks on the scheduler thread

    def put(event: tuple[int, str, Any]) -> None:
        if gone.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def hook(j: int) -> Callable[[int, Drawn], None]:
        def on_token(sample: int, drawn: Drawn) -> None:
            put((j, "token", (sample, drawn.token, drawn.logprob, tuple(drawn.topk or ()))))

        return on_token

    def settle(j: int, kind: str) -> Callable[[Any], None]:
        return lambda value: put((j, kind, value))

    ops: list[Op] = []
    texts: dict[int, IncrementalText] = {}
    first: list[int] = []  # each item's first choice index
    for j, item in enumerate(items):
        first.append(len(texts))
        for index in range(len(texts), len(texts) + item.num_samples):
            texts[index] = IncrementalText(model.tokenizer, model.info.eos_token_ids, stop, index)
        live = dataclasses.replace(item, on_token=hook(j))
        ops.append(
            Op(
                f"inference-{uuid.uuid4().hex}",
                Sample(live, model.snapshot_dir),
                settle(j, "done"),
                settle(j, "fail"),
            )
        )

    Token = tuple[int, int, float, tuple[tuple[int, float], ...]]  # choice, id, logprob, top

    def decode(tokens: list[Token]) -> list[TextDelta]:
        deltas = []
        for index, token, logprob, top in tokens:
            delta = texts[index].push(token, logprob, top)
            if delta is not None:
                deltas.append(delta)
        return deltas

    outputs: list[SampleOutput | None] = [None] * len(items)
    getter: asyncio.Future[tuple[int, str, Any]] | None = None
    try:
        for op in ops:
            model.scheduler.submit(op)
        while any(out is None for out in outputs):
            if getter is None:
                getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=KEEPALIVE_SECONDS)
            if not done:
                yield None
                continue
            events, getter = [getter.result()], None
            while not queue.empty():
                events.append(queue.get_nowait())
            tokens: list[Token] = []
            for j, kind, value in events:
                if kind == "token":
                    sample, token, logprob, top = value
                    tokens.append((first[j] + sample, token, logprob, top))
                elif kind == "done":
                    outputs[j] = value
                else:
                    raise _failure(value)
            if len(tokens) <= DECODE_ON_LOOP:
                deltas = decode(tokens)
            else:
                deltas = await asyncio.to_thread(decode, tokens)
            for delta in deltas:
                yield delta
        final = await choices(model, [out for out in outputs if out is not None], stop)
        for index, choice in enumerate(final):
            delta = texts[index].finish(choice)
            if delta is not None:
                yield delta
        yield Finished(final)
    finally:
        gone.set()
        if getter is not None:
            getter.cancel()
        for op, out in zip(ops, outputs, strict=True):
            if out is None:
                model.scheduler.cancel_sample(op.request_id)


def _failure(result: BaseException) -> InferenceError:
    if isinstance(result, UserError | ValueError):
        return InferenceError(400, str(result), "model")
    return InferenceError(500, f"sampling failed: {result}", code="server_error")


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
