"""Anthropic-compatible inference, as hosted Tinker serves it under `/anthropic/api`.

`POST /v1/messages` and `POST /v1/messages/count_tokens`: the official `anthropic` SDK (base_url
`<server>/anthropic/api`) and tools that read `ANTHROPIC_BASE_URL` work unchanged. The work is
in `inference.py`; this module is the edge: pydantic schemas (unknown optional fields ignored;
features tinkerd lacks, such as images, tools and extended thinking, refused with a 400 naming
the field), the Message and its stream events, and Anthropic's error body
`{"type": "error", "error": {"type", "message"}}`.
"""

import json
from collections.abc import AsyncIterator
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
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
}


def render_error(exc: InferenceError) -> JSONResponse:
    return JSONResponse(_error_body(exc), status_code=exc.status)


def _error_body(exc: InferenceError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(exc.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


router = inference.compat_router("/anthropic/api/v1", "anthropic", render_error)
User = Annotated[str, Depends(inference.inference_user)]
Svc = Annotated[Service, Depends(inference.service_of)]


# -- requests --------------------------------------------------------------------------------


class ContentBlock(inference.CompatRequest):
    """A content block; only `text` blocks are supported (cache_control, citations ignored)."""

    type: str
    text: str | None = None


class InputMessage(inference.CompatRequest):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class _Prompt(inference.CompatRequest):
    """What messages and count_tokens share: the model and the conversation."""

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[ContentBlock] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: Any = None
    mcp_servers: list[Any] | None = None
    output_config: dict[str, Any] | None = None

    def check_prompt(self) -> None:
        if self.tools:
            raise _unsupported("tools", "tool use is not supported")
        if self.tool_choice not in (None, {"type": "none"}, {"type": "auto"}):
            raise _unsupported("tool_choice", "tool use is not supported")
        if self.mcp_servers:
            raise _unsupported("mcp_servers", "MCP servers are not supported")
        if self.output_config and self.output_config.get("format") is not None:
            raise _unsupported("output_config.format", "structured output is not supported")
        thinking = self.thinking
        if thinking is not None and not (
            isinstance(thinking, dict) and thinking.get("type") == "disabled"
        ):
            raise _unsupported("thinking", "extended thinking is not supported")

    def conversation(self) -> tuple[list[Message], str]:
        """The messages as text (system first), and the prefill: a final assistant message is
        the start of the answer, which the model continues."""
        out = []
        if self.system is not None:
            system = _text(self.system, "system")
            if system:
                out.append(Message("system", system))
        for i, m in enumerate(self.messages):
            out.append(Message(m.role, _text(m.content, f"messages[{i}].content")))
        prefill = ""
        if out[-1].role == "assistant":
            prefill = out.pop().content
        return out, prefill


class MessagesRequest(_Prompt):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    seed: int | None = Field(None, description="extension: reproducible sampling")

    def check(self) -> None:
        self.check_prompt()
        for i, s in enumerate(self.stop_sequences or ()):
            if not s:
                raise InferenceError(400, f"stop_sequences[{i}]: empty stop sequence")

    def generation(self) -> Generation:
        return Generation(
            max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            stop=tuple(self.stop_sequences or ()),
            seed=self.seed,
        )


class CountTokensRequest(_Prompt):
    def check(self) -> None:
        self.check_prompt()


def _text(content: str | list[ContentBlock], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, block in enumerate(content):
        if block.type != "text" or block.text is None:
            raise _unsupported(
                f"{where}[{j}].type", f"content type {block.type!r} is not supported (text only)"
            )
        texts.append(block.text)
    return "\n".join(texts)


def _unsupported(param: str, problem: str) -> InferenceError:
    return InferenceError(400, f"{param}: {problem} by tinkerd", param)


# -- responses -------------------------------------------------------------------------------


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence"] | None
    stop_sequence: str | None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


# -- routes ----------------------------------------------------------------------------------


@router.post("/messages", response_model=None)
async def messages(
    body: MessagesRequest, user: User, svc: Svc
) -> MessageResponse | StreamingResponse:
    body.check()
    conversation, prefill = body.conversation()

    def prepare() -> tuple[Model, list[int]]:
        model = inference.resolve_model(svc, user, body.model)
        return model, inference.chat_prompt(model, conversation, prefill)

    model, prompt = await run_in_threadpool(prepare)
    gen = body.generation()
    item = inference.sample_input(
        model, prompt, gen, default_max_tokens=body.max_tokens, prompt_field="messages"
    )
    message_id = inference.new_id("msg_")
    if body.stream:
        return StreamingResponse(
            _stream(model, item, gen, body.model, message_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    [output] = await inference.generate(model, [item])
    [choice] = await inference.choices(model, [output], gen.stop)
    return MessageResponse(
        id=message_id,
        model=body.model,
        content=[TextBlock(text=choice.text)],
        stop_reason=_stop_reason(choice),
        stop_sequence=choice.stop_sequence,
        usage=Usage(input_tokens=len(prompt), output_tokens=choice.generated_tokens),
    )


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, user: User, svc: Svc) -> TokenCount:
    """The prompt's length in tokens, rendered exactly as /v1/messages would."""
    body.check()
    conversation, prefill = body.conversation()

    def count() -> int:
        model = inference.resolve_model(svc, user, body.model)
        return inference.count_prompt_tokens(model, conversation, prefill)

    return TokenCount(input_tokens=await run_in_threadpool(count))


async def _stream(
    model: Model, item: SampleInput, gen: Generation, name: str, message_id: str
) -> AsyncIterator[str]:
    """Anthropic's event sequence: `message_start` and `content_block_start` at once, a
    `content_block_delta` as each piece of text is sampled (`ping`s while nothing else goes
    out), then `content_block_stop`, `message_delta` (stop reason, output tokens) and
    `message_stop`; an `error` event if the sample fails."""
    start = MessageResponse(
        id=message_id,
        model=name,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=Usage(input_tokens=len(item.prompt), output_tokens=0),
    )
    yield _event("message_start", {"type": "message_start", "message": start.model_dump()})
    block = {"type": "text", "text": ""}
    yield _event(
        "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
    )
    ping = _event("ping", {"type": "ping"})
    yield ping
    choice: Choice | None = None
    try:
        async for event in inference.stream(model, [item], gen.stop):
            if event is None:
                yield ping
            elif isinstance(event, inference.Finished):
                [choice] = event.choices
            elif event.text:
                delta = {"type": "text_delta", "text": event.text}
                yield _event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
    except InferenceError as exc:
        yield _event("error", _error_body(exc))
        return
    assert choice is not None
    yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield _event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(choice), "stop_sequence": choice.stop_sequence},
            "usage": {"output_tokens": choice.generated_tokens},
        },
    )
    yield _event("message_stop", {"type": "message_stop"})


def _stop_reason(choice: Choice) -> Literal["end_turn", "max_tokens", "stop_sequence"]:
    if choice.stop_sequence is not None:
        return "stop_sequence"
    return "max_tokens" if choice.finish == "length" else "end_turn"


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"
