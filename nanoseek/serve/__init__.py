"""Serving: an OpenAI-compatible HTTP server over the engine, and a terminal chat.

reasoning.py  split R1 output into reasoning_content / content, also across streamed deltas
schemas.py    request / response / error bodies of the OpenAI API (pydantic)
loop.py       EngineLoop: the one thread that steps the engine; per-request async queues
app.py        create_app(engine, tokenizer, name): FastAPI routes, limits, SSE streams
handlers.py   OpenAIServer: requests -> engine requests (limits, templating) -> responses
guards.py     what comes off the wire: API key, body-size limit (413), JSON parsing (400)
server.py     serve() for the CLI, ServerThread for tests and benchmarks (127.0.0.1)
loading.py    load_engine(dir): checkpoint + tokenizer -> Engine
chat.py       `nanoseek chat`: multi-turn, streaming, thinking shown apart

FastAPI and uvicorn are imported only by app.py, guards.py, handlers.py and server.py:
`nanoseek chat` and the reasoning splitter work without them.
"""

from nanoseek.serve.reasoning import ReasoningSplitter, prompt_opens_think, split_reasoning

__all__ = ["ReasoningSplitter", "create_app", "prompt_opens_think", "split_reasoning"]


def __getattr__(name: str):
    if name == "create_app":  # lazily: importing FastAPI costs ~0.5 s
        from nanoseek.serve.app import create_app  # optional: fastapi (heavy)

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
