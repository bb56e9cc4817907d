"""The inference server behind `python -m payload.serve`: the engine (`engine`), the OpenAI-compatible wire format
(`openai_schema`), the Gradio chat UI (`ui`) and the FastAPI app that serves them on one port (`app`)."""
