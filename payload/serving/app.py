"""The HTTP app for one loaded engine: the OpenAI-compatible API and /healthz on FastAPI, the Gradio UI at `/`."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from payload.serving.engine import Engine, Generation, GenerationError, SamplingParams
from payload.serving.openai_schema import (
    APIError,
    ChatCompletionRequest,
    completion_chunk,
    completion_response,
    error_body,
    usage_body,
    usage_chunk,
    validation_message,
)
from payload.serving.ui import mount_ui

log = logging.getLogger("payload.serve")  # the server's one logger name, as its operators know it from the log

API_KEY_ENV = "TUNEOPS_SERVE_API_KEY"


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
            return completion_response(completion_id, created, engine.model_id, text, gen.finish_reason,
                                       usage_body(gen.prompt_tokens, gen.completion_tokens))
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
        mount_ui(app, engine, api_key)
    return app


async def _events(gen: Generation, completion_id: str, created: int, model: str, include_usage: bool):
    """The SSE body of a streamed completion, ending with `data: [DONE]`."""
    try:
        yield sse(completion_chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None))
        async for piece in iterate_in_threadpool(iter(gen)):
            yield sse(completion_chunk(completion_id, created, model, {"content": piece}, None))
        yield sse(completion_chunk(completion_id, created, model, {}, gen.finish_reason))
        if include_usage:
            yield sse(usage_chunk(completion_id, created, model, usage_body(gen.prompt_tokens, gen.completion_tokens)))
    except GenerationError as e:
        # The 200 and its headers are already sent: report the failure in the stream, as OpenAI does.
        log.error("generation failed while streaming", exc_info=e.__cause__)
        yield sse(error_body("the model failed while generating; the server log has the details", type="server_error"))
    finally:
        gen.cancel()  # a client that hung up must not keep the model busy
    yield sse("[DONE]")
