"""The Gradio chat UI mounted at `/`: a chat with any served model (a picker over the base and its adapters, filled
again on each page load so that adapters the manifest added since show up), signed in with the API key when the
server has one."""

from __future__ import annotations

import hmac
import os
from typing import Any

from fastapi import FastAPI

from payload.serving.engine import Engine, SamplingParams
from payload.serving.openai_schema import APIError


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


def mount_ui(app: FastAPI, engine: Engine, api_key: str | None) -> None:
    # Gradio reports usage to its servers unless told not to; the container has no business calling out.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr  # heavy, and a server started with --no-ui never needs it

    def chat(message: str, history: list[dict[str, Any]], temperature: float, max_tokens: float,
             model: str | None = None):
        messages = history_messages(history) + [{"role": "user", "content": message}]
        try:
            gen = engine.generate(messages, SamplingParams(max_tokens=int(max_tokens), temperature=temperature),
                                  model=model or None)
        except APIError as e:
            raise gr.Error(e.message) from None
        answer = ""
        for piece in gen:
            answer += piece
            yield answer

    def model_choices():
        ids = [m.id for m in engine.models()]
        return gr.Dropdown(choices=ids, value=engine.model_id)

    with gr.Blocks(title=f"tuneops: {engine.base_id}", analytics_enabled=False) as demo:
        # The picker goes last among the inputs, so that API callers who name none get the default model.
        picker = gr.Dropdown(choices=[m.id for m in engine.models()], value=engine.model_id, label="Model",
                             allow_custom_value=True, render=False)
        gr.ChatInterface(
            chat,
            title=f"tuneops: {engine.base_id}",
            description=engine.description,
            additional_inputs=[
                gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature"),
                gr.Slider(1, min(2048, engine.max_context), value=min(256, engine.max_context), step=1,
                          label="Max new tokens"),
                picker,
            ],
            analytics_enabled=False,
            api_name="chat",
        )
        demo.load(model_choices, None, picker, api_name=False)
    auth = None
    if api_key is not None:
        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    gr.mount_gradio_app(app, demo, path="/", auth=auth, ssr_mode=False, mcp_server=False,
                        auth_message="Sign in with any user name and the server's API key as the password.")
