"""The OpenAI-compatible API's wire format: the chat completion request, the response and stream chunk bodies, and
errors in OpenAI's shape. Pure data: no model, no HTTP server.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4  # OpenAI's limit; clients written against it never send more


# ---------------------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape.

class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Turn pydantic's first error into (message, param), e.g. ('messages.0.role: Input should be ...', 'messages.0.role')."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    if first["type"] == "missing" and param is None:
        return "the request body is empty: send a JSON object with 'messages'", None
    msg = first.get("msg", "invalid value")
    if first["type"] == "value_error" and "error" in first.get("ctx", {}):
        msg = str(first["ctx"]["error"])  # our own validators' words, without pydantic's "Value error, " prefix
    return (f"{param}: {msg}" if param else f"request body: {msg}"), param


# ---------------------------------------------------------------------------------------------------------------------
# The request body of POST /v1/chat/completions. Unknown fields are ignored as OpenAI does; fields we know but
# cannot honour are refused with a message rather than silently dropped.

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):
            if any(p.type != "text" or p.text is None for p in v):
                raise ValueError("only text content parts are supported (type 'text' with a 'text' field)")
            return "\n".join(p.text for p in v)
        return v

    def as_template_message(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for "system"; chat templates only know the latter.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    # An extension (vLLM has the same field): keep generating past the end-of-turn token, up to max_tokens. For
    # benchmarks that need every answer the same length; clients that do not send it get OpenAI's behaviour.
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported: this server generates one choice a request; send several "
                             "requests for several answers")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v):
        if v != 0:
            raise ValueError("presence and frequency penalties are not supported by this server; leave them at 0")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported by this server; leave logprobs unset")
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools and function calling are not supported by this server")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v):
        if v and v.get("type", "text") != "text":
            raise ValueError(f"response_format type {v.get('type')!r} is not supported; only 'text' is")
        return v


# ---------------------------------------------------------------------------------------------------------------------
# The response bodies of POST /v1/chat/completions: one completion, or the chunks of a stream.

def completion_response(completion_id: str, created: int, model: str, text: str, finish_reason: str | None,
                        usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage,
    }


def completion_chunk(completion_id: str, created: int, model: str, delta: dict[str, str],
                     finish_reason: str | None) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(completion_id: str, created: int, model: str, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream when the client asked for `stream_options.include_usage`."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
