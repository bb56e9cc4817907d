"""The HTTP app for one engine (a base and its adapters): the OpenAI-compatible API, /healthz and the adapter admin
routes on FastAPI, the Gradio UI at `/`."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from payload.serving.batching import Generation, GenerationError
from payload.serving.engine import Engine, SamplingParams
from payload.serving.manifest import AdapterManifest
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


def build_app(engine: Engine, *, api_key: str | None = None, ui: bool = True,
              manifest: AdapterManifest | None = None) -> FastAPI:
    """The whole server for one engine; `api_key` (when set) guards /v1/*, /admin/* and the UI. `manifest` (from
    `--adapters`) is what /admin/adapters reports and /admin/reload re-reads."""
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if manifest is not None:
            # The last requests served are recorded on the way out (a scale-in's SIGTERM: uvicorn then re-raises
            # the signal, so nothing after uvicorn.run would run).
            manifest.stop()

    app = FastAPI(title="tuneops inference", description=engine.description, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer", **e.headers} if e.status == 401 else e.headers
        return JSONResponse(e.body(), status_code=e.status, headers=headers or None)

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

    @app.get("/healthz")
    def healthz():
        # The app is built only once the base (and --adapter) is loaded, so answering at all means ready.
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def list_models():
        return {"object": "list", "data": [m.card(engine.base_id) for m in engine.models()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    def get_model(model_id: str):
        return engine.resolve(model_id).card(engine.base_id)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    def chat_completions(req: ChatCompletionRequest):
        params = SamplingParams(max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p, stop=tuple(req.stop or ()), seed=req.seed,
                                ignore_eos=req.ignore_eos)
        gen = engine.generate([m.as_template_message() for m in req.messages], params, model=req.model)
        model_id = gen.served.id
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            text = "".join(gen)
            return completion_response(completion_id, created, model_id, text, gen.finish_reason,
                                       usage_body(gen.prompt_tokens, gen.completion_tokens))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_events(gen, completion_id, created, model_id, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def the_manifest() -> AdapterManifest:
        if manifest is None:
            raise APIError(400, "this server was started without --adapters FILE, so it has no adapter manifest to "
                                "report or reload; restart it with --adapters to load adapters while it runs")
        return manifest

    @app.get("/admin/adapters", dependencies=[Depends(authorized)])
    def adapter_status():
        return the_manifest().status()

    @app.post("/admin/reload", dependencies=[Depends(authorized)])
    def reload_adapters():
        # In a worker thread (FastAPI runs sync routes there): an unload may wait for requests still generating.
        return the_manifest().sync()

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
        async for piece in gen.text_chunks():
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
