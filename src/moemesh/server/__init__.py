"""``moemesh serve``: OpenAI-, Anthropic- and Ollama-compatible HTTP API over the continuous-batching engine.

Threads: uvicorn's event loop serves HTTP; one engine thread (core/engine_loop) owns the Engine and
loops ``step()``; prompt threads render chat templates and tokenize (core/prompting); a loader
thread loads the model after the HTTP server is up (/health: 503, then 200). A request: connection
deadlines and size limits (common/protocol, common/body_limit) -> API key (common/auth) -> route
(validate with pydantic, model name, cheap length check, render + tokenize off the loop, exact
context check) -> admission (429 past --queue-size) -> Generation (submit to the engine thread,
read its tokens from an asyncio queue) -> detokenize -> stop strings -> reasoning -> tool calls ->
deltas that the route renders as OpenAI or Anthropic JSON / SSE. A client that leaves aborts its
sequence.

Packages, one per concern:

- ``common/``: HTTP plumbing every API surface shares (connection deadlines, limits, errors, auth,
  the strict request-body base, the OpenAPI document).
- ``core/``: one request through the engine, whatever API it came in by (state, engine thread,
  admission, generation, prompting, sampling fields, stop strings, SSE, metrics).
- ``openai/``: OpenAI's chat and completions APIs, /v1/models, vLLM's /tokenize and /detokenize.
- ``anthropic/``: Anthropic's Messages API.
- ``responses_api/``: OpenAI's Responses API (/v1/responses, stateless).
- ``ollama/``: Ollama's API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version).
- A new API surface is a sibling package with its schemas, responses and routes, built on
  ``core`` and registered in ``app.py``; constrained output
  (grammars, JSON schema) belongs below the server, next to the sampler, fed by ``core/generation``.

The chat, tool-call and reasoning formats (templates, Harmony, DeepSeek, Hermes, ``<think>``) live
in ``moemesh.tokenizer.formats``, below the engine, so the CLI and the models can use them too.
Modules at this level: app (the ASGI app), service (/health, /metrics), launcher (run the server as
a child process: tests, benchmarks).
"""
