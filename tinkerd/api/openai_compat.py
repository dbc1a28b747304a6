"""OpenAI-compatible inference, as hosted Tinker serves it under `/oai/api/v1`.

`POST /chat/completions`, `POST /completions` (legacy) and `GET /models`, so the official
`openai` SDK (base_url `<server>/oai/api/v1`) and tools that speak OpenAI work unchanged. The
work is in `inference.py`; this module is the edge: pydantic schemas (unknown optional fields
are ignored, as the real API has many; features tinkerd lacks are refused with a 400 naming
the field, never silently dropped), the response and `chat.completion.chunk` shapes, and
OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
"""

import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from tinkerd.api import inference
from tinkerd.api.inference import Choice, Generation, InferenceError, Message, Model
from tinkerd.api.service import Service
from tinkerd.model.types import SampleInput

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
}
MAX_N = 128  # OpenAI's bound on `n`
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs`, as OpenAI
MAX_LEGACY_LOGPROBS = 5  # completions `logprobs`, as OpenAI
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the legacy endpoint's documented default
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment, sent while a stream has nothing else to send


def render_error(exc: InferenceError) -> JSONResponse:
    code = exc.code
    if code is None and exc.status == 401:
        code = "invalid_api_key"
    body = {
        "error": {
            "message": exc.message,
            "type": ERROR_TYPES.get(exc.status, "server_error"),
            "param": exc.param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=exc.status)


router = inference.compat_router("/oai/api/v1", "openai", render_error)
User = Annotated[str, Depends(inference.inference_user)]
Svc = Annotated[Service, Depends(inference.service_of)]


# -- requests --------------------------------------------------------------------------------


class ContentPart(inference.CompatRequest):
    """A part of a message's content; only `text` parts are supported."""

    type: str
    text: str | None = None


class ChatMessage(inference.CompatRequest):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None


class StreamOptions(inference.CompatRequest):
    include_usage: bool = False


class _Sampling(inference.CompatRequest):
    """What chat and legacy completions share."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="extension (as vLLM): -1 = off")
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check_common(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise _unsupported(name, "penalties are not supported (only 0)")
        if self.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
        if self.top_k == 0:
            raise InferenceError(400, "top_k: must be -1 (off) or >= 1", "top_k")
        for i, s in enumerate(self.stop_strings()):
            if not s:
                raise InferenceError(400, f"stop[{i}]: empty stop string", "stop")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def generation(self, max_tokens: int | None, top_logprobs: int) -> Generation:
        return Generation(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            stop=self.stop_strings(),
            seed=self.seed,
            n=self.n or 1,
            top_logprobs=top_logprobs,
        )

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    prediction: Any = None
    modalities: list[str] | None = None
    web_search_options: Any = None

    def check(self) -> None:
        self.check_common()
        for name in ("tools", "functions", "function_call", "audio", "prediction"):
            if getattr(self, name):
                raise _unsupported(name, f"{name} is not supported (text generation only)")
        if self.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice", "tool_choice is not supported (no tools)")
        if self.web_search_options is not None:
            raise _unsupported("web_search_options", "web search is not supported")
        if self.response_format is not None and self.response_format != {"type": "text"}:
            raise _unsupported("response_format", "response_format is not supported (text only)")
        if self.modalities not in (None, ["text"]):
            raise _unsupported("modalities", "only the text modality is supported")
        if self.top_logprobs and not self.logprobs:
            raise InferenceError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")

    def chat(self) -> list[Message]:
        """The conversation as text messages (`developer` is the newer name of `system`)."""
        out = []
        for i, m in enumerate(self.messages):
            where = f"messages[{i}]"
            if m.role not in ("system", "developer", "user", "assistant"):
                raise _unsupported(
                    f"{where}.role", f"role {m.role!r} is not supported (no tool use)"
                )
            if m.tool_calls or m.function_call:
                raise _unsupported(f"{where}.tool_calls", "tool calls are not supported")
            role = "system" if m.role == "developer" else m.role
            out.append(Message(role, _text(m.content, where)))  # type: ignore[arg-type]
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise _unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of not in (None, self.n or 1):
            raise _unsupported("best_of", "best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            raise _unsupported("echo", "echo together with logprobs is not supported")

    def prompts(self) -> list[str | list[int]]:
        """One or more prompts: text, token ids, or lists of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise InferenceError(400, "prompt: must not be empty", "prompt")
        return list(p)  # type: ignore[arg-type]


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _unsupported(
                f"{where}.content[{j}].type",
                f"content type {part.type!r} is not supported (text only)",
            )
        texts.append(part.text)
    return "\n".join(texts)


def _unsupported(param: str, problem: str) -> InferenceError:
    return InferenceError(400, f"{param}: {problem} by tinkerd", param, "unsupported_parameter")


# -- responses -------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tinkerd"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- routes ----------------------------------------------------------------------------------


@router.get("/models")
def list_models(user: User, svc: Svc) -> ModelList:
    """The served base models (a `tinker://` checkpoint path is a valid `model` too)."""
    now = int(time.time())
    return ModelList(data=[ModelCard(id=info.name, created=now) for info in svc.infos()])


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, user: User, svc: Svc
) -> ChatCompletion | StreamingResponse:
    body.check()
    messages = body.chat()

    def prepare() -> tuple[Model, list[int]]:
        model = inference.resolve_model(svc, user, body.model)
        return model, inference.chat_prompt(model, messages)

    model, prompt = await run_in_threadpool(prepare)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    gen = body.generation(body.max_completion_tokens or body.max_tokens, top)
    item = inference.sample_input(
        model,
        prompt,
        gen,
        default_max_tokens=inference.DEFAULT_CHAT_MAX_TOKENS,
        prompt_field="messages",
        max_tokens_field=field,
    )
    completion_id, created = inference.new_id("chatcmpl-"), int(time.time())
    if body.stream:
        events = _chat_stream(model, item, gen, body, completion_id, created)
        return _sse(events)
    [output] = await inference.generate(model, [item])
    choices = await inference.choices(model, [output], gen.stop)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=_chat_logprobs(model, c.pieces) if body.logprobs else None,
                finish_reason=c.finish,
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(len(prompt), choices),
    )


async def _chat_stream(
    model: Model,
    item: SampleInput,
    gen: Generation,
    body: ChatCompletionRequest,
    completion_id: str,
    created: int,
) -> AsyncIterator[str]:
    """`chat.completion.chunk`s: a role delta per choice at once, then content deltas as the
    tokens are sampled (choices interleaved, each chunk with its `index`; with logprobs, each
    token's in the chunk where its text starts), a finish chunk per choice, the usage chunk if
    asked for, and `[DONE]`. Keep-alive comments while nothing else goes out."""
    usage_field = body.include_usage()

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        out = ChatCompletionChunk(
            id=completion_id, created=created, model=body.model, choices=choices, usage=usage
        )
        exclude = None if usage_field else {"usage"}
        return _data(out.model_dump_json(exclude=exclude))

    for i in range(gen.n):
        yield chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""))])
    choices: list[Choice] = []
    try:
        async for event in inference.stream(model, [item], gen.stop):
            if event is None:
                yield KEEPALIVE
            elif isinstance(event, inference.Finished):
                choices = event.choices
            elif event.text or (body.logprobs and event.pieces):
                logprobs = _chat_logprobs(model, event.pieces) if body.logprobs else None
                delta = ChunkDelta(content=event.text)
                yield chunk([ChunkChoice(index=event.index, delta=delta, logprobs=logprobs)])
    except InferenceError as exc:
        yield _data(render_error(exc).body.decode())
        return
    for i, c in enumerate(choices):
        yield chunk([ChunkChoice(index=i, delta=ChunkDelta(), finish_reason=c.finish)])
    if usage_field:
        yield chunk([], _usage(len(item.prompt), choices))
    yield _data("[DONE]")


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, user: User, svc: Svc
) -> Completion | StreamingResponse:
    body.check()
    prompts = body.prompts()

    def prepare() -> tuple[Model, list[list[int]]]:
        model = inference.resolve_model(svc, user, body.model)
        return model, [inference.text_prompt(model, p) for p in prompts]

    model, tokenized = await run_in_threadpool(prepare)
    top = body.logprobs or 0
    gen = body.generation(body.max_tokens, top)
    items = [
        inference.sample_input(
            model,
            tokens,
            gen,
            default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
            prompt_field="prompt",
        )
        for tokens in tokenized
    ]
    # With echo the prompt's text comes first (token prompts decoded).
    echoes = [
        (p if isinstance(p, str) else model.tokenizer.decode(p)) if body.echo else ""
        for p in prompts
    ]
    completion_id, created = inference.new_id("cmpl-"), int(time.time())
    if body.stream:
        return _sse(_completion_stream(model, items, gen, body, echoes, completion_id, created))
    outputs = await inference.generate(model, items)
    choices = await inference.choices(model, outputs, gen.stop)
    return Completion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[
            CompletionChoice(
                index=i,
                text=echoes[i // gen.n] + c.text,
                logprobs=_legacy_logprobs(model, c.pieces) if body.logprobs is not None else None,
                finish_reason=c.finish,
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(sum(len(item.prompt) for item in items), choices),
    )


async def _completion_stream(
    model: Model,
    items: list[SampleInput],
    gen: Generation,
    body: CompletionRequest,
    echoes: list[str],
    completion_id: str,
    created: int,
) -> AsyncIterator[str]:
    """`text_completion` chunks: with echo, each choice's prompt text at once (index = prompt ×
    n + sample); text deltas as the tokens are sampled (choices interleaved; with logprobs,
    each token's in the chunk where its text starts, `text_offset` counted from the start of
    the completion); a finish chunk per choice; the usage chunk if asked for; `[DONE]`."""
    usage_field = body.include_usage()

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        out = Completion(
            id=completion_id, created=created, model=body.model, choices=choices, usage=usage
        )
        return _data(out.model_dump_json(exclude=None if usage_field else {"usage"}))

    def text(index: int, text: str, logprobs: LegacyLogprobs | None = None) -> str:
        return chunk(
            [CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=None)]
        )

    for i in range(len(items) * gen.n):
        if echoes[i // gen.n]:
            yield text(i, echoes[i // gen.n])
    choices: list[Choice] = []
    try:
        async for event in inference.stream(model, items, gen.stop):
            if event is None:
                yield KEEPALIVE
            elif isinstance(event, inference.Finished):
                choices = event.choices
            elif event.text or (body.logprobs is not None and event.pieces):
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _legacy_logprobs(model, event.pieces, event.offset)
                yield text(event.index, event.text, logprobs)
    except InferenceError as exc:
        yield _data(render_error(exc).body.decode())
        return
    for i, c in enumerate(choices):
        yield chunk([CompletionChoice(index=i, text="", logprobs=None, finish_reason=c.finish)])
    if usage_field:
        yield chunk([], _usage(sum(len(item.prompt) for item in items), choices))
    yield _data("[DONE]")


# -- shaping ---------------------------------------------------------------------------------


def _usage(prompt_tokens: int, choices: Sequence[Choice]) -> Usage:
    completion = sum(c.generated_tokens for c in choices)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


def _top(model: Model, token: int, logprob: float) -> TopLogprob:
    text = inference.token_text(model, token)
    return TopLogprob(token=text, logprob=logprob, bytes=inference.token_bytes(model, token))


def _chat_logprobs(model: Model, pieces: Sequence[inference.Piece]) -> ChoiceLogprobs:
    """OpenAI's `logprobs.content`: each output token, its logprob (under the distribution it
    was sampled from: temperature-scaled, before top-k/top-p, as Tinker), and the top-K."""
    content = []
    for p in pieces:
        top = [_top(model, t, lp) for t, lp in p.top]
        head = _top(model, p.token, p.logprob)
        content.append(TokenLogprob(**head.model_dump(), top_logprobs=top))
    return ChoiceLogprobs(content=content)


def _legacy_logprobs(
    model: Model, pieces: Sequence[inference.Piece], offset: int = 0
) -> LegacyLogprobs:
    """The completions endpoint's `logprobs`: tokens, their logprobs, the top-K as
    `{token: logprob}` (with the sampled token, as OpenAI), and each token's text offset
    (the first's: `offset`)."""
    tokens, top, offsets = [], [], []
    for p in pieces:
        text = inference.token_text(model, p.token)
        alternatives = {inference.token_text(model, t): lp for t, lp in p.top}
        alternatives.setdefault(text, p.logprob)
        tokens.append(text)
        top.append(alternatives)
        offsets.append(offset)
        offset += len(p.text)
    return LegacyLogprobs(
        tokens=tokens,
        token_logprobs=[p.logprob for p in pieces],
        top_logprobs=top,
        text_offset=offsets,
    )


def _data(payload: str) -> str:
    return f"data: {payload}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
