"""The inference server that runs in the container: `python -m payload.serve --base PATH [--adapter PATH]`.

One port serves a Gradio chat UI at `/`, an OpenAI-compatible `/v1/chat/completions` and `/v1/models`, and `/healthz`.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("payload.serve")

API_KEY_ENV = "TUNEOPS_SERVE_API_KEY"
DEFAULT_MAX_TOKENS = 512
MAX_STOP_SEQUENCES = 4  # OpenAI's limit; clients written against it never send more


# ---------------------------------------------------------------------------------------------------------------------
# Startup checks: a wrong path is a one-line message and exit code 2, never a traceback.

class StartupError(Exception):
    """What is wrong with the model or adapter given on the command line, and what to do, in one line."""


def check_base(base: Path) -> None:
    if not base.is_dir():
        raise StartupError(f"base model folder not found: {base} (give --base the folder that holds config.json)")
    if not (base / "config.json").is_file():
        raise StartupError(f"no config.json in {base}: --base must be a model folder saved by transformers")


def check_adapter(adapter: Path) -> dict[str, Any]:
    """Return the adapter's parsed adapter_config.json."""
    if not adapter.is_dir():
        raise StartupError(f"adapter folder not found: {adapter} (a finished run writes it to <run folder>/adapter; "
                           "use --base-only to serve the base model alone)")
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise StartupError(f"adapter_config.json not found in {adapter}: give --adapter the folder a finished run "
                           "wrote (<run folder>/adapter), or --base-only to serve the base model alone")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StartupError(f"{config_file} cannot be read as JSON ({e}); the adapter folder is damaged, "
                           "copy it again from the run folder") from None
    if not isinstance(config, dict):
        raise StartupError(f"{config_file} is not a JSON object; the adapter folder is damaged")
    return config


LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def adapter_mismatch(adapter_shapes: dict[str, tuple[int, ...]],
                     base_linears: dict[str, tuple[int, int]]) -> str | None:
    """Say why LoRA weights (key -> shape) do not fit a base's linear layers (name -> (in, out)); None when they do.

    lora_A is (r, in_features) and lora_B is (out_features, r) of the layer they adapt.
    """
    for key in sorted(adapter_shapes):
        m = LORA_KEY.match(key)
        if m is None:
            continue
        module, part = m["module"], m["part"]
        if module not in base_linears:
            return f"the adapter changes layer {module}, which the base model does not have"
        in_features, out_features = base_linears[module]
        shape = adapter_shapes[key]
        got, expected = (shape[1], in_features) if part == "A" else (shape[0], out_features)
        side = "inputs" if part == "A" else "outputs"
        if got != expected:
            return f"layer {module} has {expected} {side} in the base model but {got} in the adapter"
    return None


def default_model_id(base: Path, adapter: Path | None) -> str:
    """The id clients see: the run id for `<run folder>/adapter`, else the adapter's or the base's folder name."""
    if adapter is None:
        return base.resolve().name
    adapter = adapter.resolve()
    return adapter.parent.name if adapter.name == "adapter" else adapter.name


# ---------------------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape.

class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

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
# The engine: one loaded model, generation serialized by a lock, text streamed from a background thread.

class StopScanner:
    """Finds stop sequences in text that arrives in pieces, holding back a tail that may be the start of one."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Return (text that is safe to send, whether a stop sequence was met)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: as many as DEFAULT_MAX_TOKENS and the context allow
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class GenerationError(RuntimeError):
    """The model failed while generating (an error of ours, logged with its traceback)."""


class Generation:
    """One generation, run in a background thread once iterated. Iterate it for text pieces; afterwards
    `finish_reason`, `prompt_tokens` and `completion_tokens` are set. Closing the iteration early stops the model."""

    def __init__(self, engine: Engine, prompt_ids: list[int], max_tokens: int, params: SamplingParams):
        from transformers import TextIteratorStreamer

        self.engine = engine
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._last_token: int | None = None
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._hit_stop = False
        self._stopped_early = False
        self._streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._thread = threading.Thread(target=self._run, name="generate", daemon=True)

    def cancel(self) -> None:
        self._cancelled.set()

    def _should_stop(self, input_ids, scores, **kwargs):
        """generate()'s stopping criterion: stop as soon as the request is cancelled."""
        import torch

        stop = self._cancelled.is_set()
        self._stopped_early |= stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def _run(self) -> None:
        import torch

        ended = False
        try:
            with self.engine.lock:
                if self._cancelled.is_set():
                    return
                ids = torch.tensor([self.prompt_ids], device=self.engine.model.device)
                kwargs: dict[str, Any] = {"max_new_tokens": self.max_tokens, "do_sample": self.params.temperature > 0}
                if kwargs["do_sample"]:
                    kwargs.update(temperature=self.params.temperature, top_p=self.params.top_p)
                    if self.params.seed is not None:
                        torch.manual_seed(self.params.seed)
                out = self.engine.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), streamer=self._streamer,
                    stopping_criteria=[self._should_stop], pad_token_id=self.engine.pad_token_id, **kwargs)
                ended = True  # generate() ends the streamer itself
                self.completion_tokens = out.shape[1] - ids.shape[1]
                self._last_token = int(out[0, -1]) if self.completion_tokens else None
            if self._stopped_early and not self._hit_stop:
                log.info("generation stopped early after %d tokens: the client went away", self.completion_tokens)
        except BaseException as e:  # handed to the reader, which raises it in the request's thread
            self._error = e
        finally:
            if not ended:
                self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        started = time.monotonic()
        self._thread.start()
        scanner = StopScanner(self.params.stop)
        hit_stop = False
        try:
            for piece in self._streamer:
                text, hit_stop = scanner.feed(piece)
                if text:
                    yield text
                if hit_stop:
                    self._hit_stop = True
                    self.cancel()
                    break
            if not hit_stop and (tail := scanner.flush()):
                yield tail
        finally:
            self.cancel()  # if the reader went away (client disconnected), free the model for the next request
        self._thread.join()
        if self._error is not None:
            raise GenerationError(f"generation failed: {self._error!r}") from self._error
        ran_out = self.completion_tokens >= self.max_tokens and self._last_token not in self.engine.eos_ids
        self.finish_reason = "length" if ran_out and not hit_stop else "stop"
        seconds = time.monotonic() - started
        log.info("generated model=%s prompt_tokens=%d completion_tokens=%d seconds=%.2f tokens_per_s=%.1f finish=%s",
                 self.engine.model_id, self.prompt_tokens, self.completion_tokens, seconds,
                 self.completion_tokens / seconds if seconds else 0.0, self.finish_reason)


class Engine:
    """A loaded model and tokenizer. One model is shared by all requests, so generation holds `lock`."""

    def __init__(self, model, tokenizer, model_id: str, *, description: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.description = description or model_id
        self.created = int(time.time())
        self.lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to call from two threads at once
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids: the chat template with the assistant's turn opened."""
        from jinja2 import TemplateError

        with self._tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as e:
                raise APIError(400, f"the model's chat template refused these messages: {e}",
                               param="messages") from None
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, messages: list[dict[str, str]], params: SamplingParams) -> Generation:
        prompt_ids = self.encode(messages)
        room = self.max_context - len(prompt_ids)
        if params.max_tokens is None and room < 1 or params.max_tokens is not None and params.max_tokens > room:
            asked = params.max_tokens or 1
            raise APIError(400, f"this model's maximum context length is {self.max_context} tokens, but "
                                f"{len(prompt_ids)} are in the messages and {asked} more were asked for; shorten the "
                                "messages or lower max_tokens", param="messages", code="context_length_exceeded")
        max_tokens = params.max_tokens or min(DEFAULT_MAX_TOKENS, room)
        return Generation(self, prompt_ids, max_tokens, params)


def load_engine(base: Path, adapter: Path | None, *, load_in_4bit: bool | None = None,
                model_name: str | None = None) -> Engine:
    """Load the base (4-bit NF4 on GPU; fp32 on CPU unless `load_in_4bit`) and apply the adapter, if any."""
    check_base(base)
    adapter_config = check_adapter(adapter) if adapter is not None else None
    from payload.runtime import torch_problem

    problem = torch_problem()
    if problem:
        raise StartupError(problem)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    on_gpu = torch.cuda.is_available()
    four_bit = on_gpu if load_in_4bit is None else load_in_4bit
    # bf16 compute on GPU (fp16 is unstable with NF4); CPUs have no fast bf16 matmul, so fp32 there.
    compute = torch.bfloat16 if on_gpu else torch.float32
    kwargs: dict[str, Any] = {"device_map": {"": 0 if on_gpu else "cpu"}}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    else:
        kwargs["dtype"] = compute
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    # RuntimeError: out of GPU memory; SafetensorError: a weights file cut short or damaged
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, SafetensorError) as e:
        raise StartupError(f"cannot load the base model from {base}: {_first_line(e)}") from None

    tokenizer_dir = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise StartupError(f"cannot load the tokenizer from {tokenizer_dir}: {_first_line(e)}") from None
    if not tokenizer.chat_template:
        raise StartupError(f"the tokenizer in {tokenizer_dir} has no chat template; serve an instruct/chat model "
                           "or an adapter whose folder holds the tokenizer it was trained with")

    description = f"{base.name}, {'4-bit NF4' if four_bit else str(compute).removeprefix('torch.')}, " \
                  f"{'cuda' if on_gpu else 'cpu'}"
    if adapter is not None:
        _check_adapter_fits(adapter, adapter_config, base, model)
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            raise StartupError(f"cannot apply the adapter in {adapter} to {base}: {_first_line(e)}") from None
        description += f", adapter {adapter}"
    model.eval()
    return Engine(model, tokenizer, model_name or default_model_id(base, adapter), description=description)


def _check_adapter_fits(adapter: Path, adapter_config: dict[str, Any], base: Path, model) -> None:
    """Refuse an adapter trained for another base before peft fails on it with a long shape dump."""
    trained_on = adapter_config.get("base_model_name_or_path") or "unknown"
    # Same shapes do not prove the same weights (two 7B Llamas look alike), so a different name is worth a warning.
    if trained_on != "unknown" and Path(trained_on).name != base.resolve().name:
        log.warning("the adapter names %r as its base but is served on %s; check its answers", trained_on, base)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return  # an older .bin adapter: peft's own load is the check
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise StartupError(f"{weights} cannot be read ({_first_line(e)}); the adapter folder is damaged, copy it again "
                           "from the run folder") from None
    linears = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)}
    problem = adapter_mismatch(shapes, linears)
    if problem:
        raise StartupError(f"the adapter in {adapter} was trained for a different base model ({problem}); "
                           f"adapter_config.json names {trained_on!r} as its base: serve it with that base")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------------------------------
# The HTTP app: OpenAI-compatible API and health on FastAPI, the Gradio UI mounted at "/".

def completion_response(gen: Generation, text: str, completion_id: str, created: int, model: str) -> dict[str, Any]:
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": gen.finish_reason}],
        "usage": usage(gen),
    }


def completion_chunk(completion_id: str, created: int, model: str, delta: dict[str, str],
                     finish_reason: str | None) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage(gen: Generation) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def build_app(engine: Engine, *, api_key: str | None = None, ui: bool = True) -> FastAPI:
    """The whole server for one engine; `api_key` (when set) guards /v1/* and the UI."""
    app = FastAPI(title="tuneops inference", description=engine.description)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(GenerationError)
    async def _generation_failed(request: Request, e: GenerationError):
        log.error("generation failed", exc_info=e.__cause__)
        return JSONResponse(error_body("the model failed while generating; the server log has the details",
                                       type="server_error"), status_code=500)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, f"missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                                f"the key the server was started with ({API_KEY_ENV})", code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "tuneops"}

    @app.get("/healthz")
    def healthz():
        # The app is built only once the model is loaded, so answering at all means ready.
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    def get_model(model_id: str):
        if model_id != engine.model_id:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {engine.model_id!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    def chat_completions(req: ChatCompletionRequest):
        if req.model is not None and req.model != engine.model_id:
            raise APIError(404, f"model {req.model!r} is not served here; use {engine.model_id!r} "
                                "(GET /v1/models lists it)", param="model", code="model_not_found")
        params = SamplingParams(max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p, stop=tuple(req.stop or ()), seed=req.seed)
        gen = engine.generate([m.as_template_message() for m in req.messages], params)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            text = "".join(gen)
            return completion_response(gen, text, completion_id, created, engine.model_id)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_events(gen, completion_id, created, engine.model_id, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    endpoints = {"/v1/chat/completions": "POST", "/v1/models": "GET"}

    # Without this, a wrong method or path under /v1 would fall through to the UI and get its HTML-ish 404.
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def unknown_endpoint(request: Request, rest: str):
        path = request.url.path.rstrip("/")
        if path in endpoints:
            raise APIError(405, f"{request.method} is not allowed on {path}; use {endpoints[path]}")
        listing = ", ".join(f"{m} {p}" for p, m in endpoints.items())
        raise APIError(404, f"no endpoint {request.method} {request.url.path}; this server has {listing}",
                       code="unknown_url")

    if ui:
        _mount_ui(app, engine, api_key)
    return app


async def _events(gen: Generation, completion_id: str, created: int, model: str, include_usage: bool):
    """The SSE body of a streamed completion, ending with `data: [DONE]`."""
    try:
        yield sse(completion_chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None))
        async for piece in iterate_in_threadpool(iter(gen)):
            yield sse(completion_chunk(completion_id, created, model, {"content": piece}, None))
        yield sse(completion_chunk(completion_id, created, model, {}, gen.finish_reason))
        if include_usage:
            yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage(gen)})
    except GenerationError as e:
        # The 200 and its headers are already sent: report the failure in the stream, as OpenAI does.
        log.error("generation failed while streaming", exc_info=e.__cause__)
        yield sse(error_body("the model failed while generating; the server log has the details", type="server_error"))
    finally:
        gen.cancel()  # a client that hung up must not keep the model busy
    yield sse("[DONE]")


def history_messages(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Gradio's chat history as plain {role, content} text messages (files and other components left out)."""
    out = []
    for item in history:
        content = item.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if isinstance(content, str) and content and item.get("role") in ("user", "assistant", "system"):
            out.append({"role": item["role"], "content": content})
    return out


def _mount_ui(app: FastAPI, engine: Engine, api_key: str | None) -> None:
    # Gradio reports usage to its servers unless told not to; the container has no business calling out.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def chat(message: str, history: list[dict[str, Any]], temperature: float, max_tokens: float):
        messages = history_messages(history) + [{"role": "user", "content": message}]
        try:
            gen = engine.generate(messages, SamplingParams(max_tokens=int(max_tokens), temperature=temperature))
        except APIError as e:
            raise gr.Error(e.message) from None
        answer = ""
        for piece in gen:
            answer += piece
            yield answer

    demo = gr.ChatInterface(
        chat,
        title=f"tuneops: {engine.model_id}",
        description=engine.description,
        additional_inputs=[
            gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature"),
            gr.Slider(1, min(2048, engine.max_context), value=min(256, engine.max_context), step=1,
                      label="Max new tokens"),
        ],
        analytics_enabled=False,
        api_name="chat",
    )
    auth = None
    if api_key is not None:
        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    gr.mount_gradio_app(app, demo, path="/", auth=auth, ssr_mode=False, mcp_server=False,
                        auth_message="Sign in with any user name and the server's API key as the password.")


# ---------------------------------------------------------------------------------------------------------------------
# The command line.

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m payload.serve", description=__doc__)
    ap.add_argument("--base", required=True, type=Path, help="base model folder (config.json, weights, tokenizer)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--adapter", type=Path, help="LoRA adapter folder a run wrote (<run folder>/adapter)")
    which.add_argument("--base-only", action="store_true", help="serve the base model without an adapter")
    ap.add_argument("--model-name", help="model id for clients (default: the run id, from the adapter's folder)")
    ap.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    ap.add_argument("--port", type=int, default=7860, help="port for the UI, the API and /healthz (default 7860)")
    ap.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                    help="load the base in 4-bit NF4 (default: on GPU yes, on CPU no)")
    ap.add_argument("--no-ui", action="store_true", help="serve the API and /healthz only")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Logs go to stdout; stderr carries only a startup error, in one line.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.adapter is None and not args.base_only:
        print("payload.serve: nothing to serve: give --adapter PATH (a run's adapter folder), or --base-only to "
              "serve the base model alone", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach for the hub
    try:
        _quiet_libraries()
        engine = load_engine(args.base, args.adapter, load_in_4bit=args.load_in_4bit, model_name=args.model_name)
    except StartupError as e:
        print(f"payload.serve: {e}", file=sys.stderr)
        return 2
    api_key = os.environ.get(API_KEY_ENV) or None
    app = build_app(engine, api_key=api_key, ui=not args.no_ui)
    log.info("serving %s (%s) on http://%s:%d, API key %s", engine.model_id, engine.description, args.host,
             args.port, "required" if api_key else "not required")

    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_config=None, timeout_graceful_shutdown=10)
    return 0


def _quiet_libraries() -> None:
    """Send library logs and warnings to our log on stdout, without progress bars: stderr is for startup errors."""
    import transformers

    logging.captureWarnings(True)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
