"""The inference server behind `python -m payload.serve`: the engine that holds one base and its LoRA adapters
(`engine`), the batching scheduler (`batching`), the adapter manifest followed while running (`manifest`), the
OpenAI-compatible wire format (`openai_schema`), the Gradio chat UI (`ui`) and the FastAPI app that serves them on one
port (`app`)."""
