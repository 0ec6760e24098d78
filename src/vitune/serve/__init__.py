"""Serving: the OpenAI-compatible API server with dynamic batching, its web demo, and terminal chat.

`app.create_app(pipe, ServeConfig(...))` builds the FastAPI app; `batcher.Batcher` is the one thread
that runs the model; `protocol` is the wire format; `web` the Gradio page; `chat` the terminal chat.
"""
