"""``moemesh serve``: the OpenAI- and Anthropic-compatible HTTP server with continuous batching."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from ..errors import MoemeshError
from ..experts.budget import parse_size
from ..kvcache.spec import KV_HELP, parse_kv_spec
from ..models.build import QUANT_MODES
from .cache_args import add_cache_args, requested_prefix_bytes
from .expert_args import add_expert_args, expert_options
from .limit_args import add_limit_args, connection_limits

QUANT_CHOICES = ("none",) + QUANT_MODES
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over HTTP (OpenAI and Anthropic APIs)",
        description="Serve a model over HTTP: OpenAI /v1/chat/completions, /v1/completions, /v1/models, "
        "Anthropic /v1/messages, /tokenize, /detokenize, /health, /metrics. Requests are batched "
        "continuously (they join and leave the running batch at every decode step).",
    )
    p.add_argument("model", help="checkpoint directory, .gguf file, or 'smollm2'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("MOEMESH_API_KEY"),
                   help="require this key (Authorization: Bearer KEY or x-api-key: KEY) on /v1/*, /tokenize, "
                   "/detokenize; default $MOEMESH_API_KEY, else no key")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per step (default 8)")
    p.add_argument("--queue-size", type=int, default=64,
                   help="most requests waiting or running at once; more get HTTP 429 (default 64)")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens fed per step (default 512): bounds how long a new prompt stalls the "
                   "running decodes")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length in tokens (default: the model's); longer prompts get HTTP 400")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto",
                   help="weights at run time: auto keeps them as stored (GGUF 4-bit stays 4-bit)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name reported by the API (default: from MODEL); more names are aliases that "
                   "requests may use too. Other names get HTTP 404 model_not_found")
    p.add_argument("--accept-any-model", action="store_true",
                   help="answer requests whatever model name they give (for clients whose model name cannot be set)")
    add_limit_args(p)
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.add_argument("--kv", default="dense", help=KV_HELP)
    p.add_argument("--allow-image-dir", default=None, metavar="DIR",
                   help="vision models: let requests name image files under DIR (file:// URLs or paths; default: none)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="vision models: fetch http(s) image URLs (default: refused with a 400; data URIs always work)")
    add_expert_args(p)
    add_cache_args(p, default="auto")
    p.set_defaults(func=run)


def curl_example(host: str, port: int, model: str, api_key: str | None) -> str:
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    auth = f' \\\n    -H "Authorization: Bearer {api_key}"' if api_key else ""
    return (
        f"  curl http://{host}:{port}/v1/chat/completions \\\n"
        f'    -H "Content-Type: application/json"{auth} \\\n'
        f"    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", "
        f"\"content\": \"What is the capital of France?\"}}]}}'"
    )


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MoemeshError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    for name, value in (("--max-batch", args.max_batch), ("--queue-size", args.queue_size),
                        ("--max-prefill-tokens", args.max_prefill_tokens)):
        if value < 1:
            raise MoemeshError(f"{name} must be >= 1, got {value}")
    if args.ctx is not None and args.ctx < 2:
        raise MoemeshError(f"--ctx must be >= 2, got {args.ctx}")
    if args.allow_image_dir is not None and not os.path.isdir(args.allow_image_dir):
        raise MoemeshError(f"--allow-image-dir: {args.allow_image_dir} is not a directory")
    experts = expert_options(args)  # checks --ram before anything slow
    limits = connection_limits(args)
    names = args.served_model_name or []
    experts.prefix_cache = requested_prefix_bytes(args)
    try:
        kv = str(parse_kv_spec(args.kv))
    except ValueError as e:
        raise MoemeshError(f"--kv: {e}") from None
    sock = _listen(args.host, args.port)  # before the slow imports: a busy port fails at once
    port = sock.getsockname()[1]

    import torch

    from ..server.app import build_app
    from ..server.common.protocol import http_server
    from ..server.core.images import ImagePolicy
    from ..server.core.state import ServerConfig, ServerState

    if args.threads:
        torch.set_num_threads(args.threads)  # here, on the main thread, before the engine thread exists
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(model=args.model, host=args.host, port=port, api_key=args.api_key, experts=experts, kv=kv,
                          max_batch=args.max_batch,
                          max_prefill_tokens=args.max_prefill_tokens, queue_size=args.queue_size, ctx=args.ctx,
                          quant=args.quant, threads=args.threads, limits=limits,
                          served_model_name=names[0] if names else None, model_aliases=tuple(names[1:]),
                          accept_any_model=args.accept_any_model,
                          prefix_cache=experts.prefix_cache, prompt_cache=args.prompt_cache,
                          prompt_cache_size=parse_size(args.prompt_cache_size),
                          images=ImagePolicy(args.allow_image_dir, args.allow_remote_images))
    state = ServerState(config)
    server = None

    def on_loaded(st: ServerState) -> None:
        if st.status == "ready":
            print(f"moemesh: ready: {st.model_name} loaded in {st.load_seconds:.1f}s, context {st.context_length}, "
                  f"max batch {config.max_batch}, queue {config.queue_size}. Try:\n"
                  f"{curl_example(args.host, port, st.model_name, config.api_key)}", flush=True)
        else:
            print(f"moemesh: error: cannot load {args.model}: {st.load_error}", file=sys.stderr, flush=True)
            if server is not None:
                server.should_exit = True

    app = build_app(state, on_loaded)
    print(f"moemesh: listening on http://{args.host}:{port} (loading {args.model}; /health answers 503 "
          "until it is ready)", flush=True)
    server = http_server(app, limits, log_level=args.log_level, access_log=args.log_level == "debug")
    server.run(sockets=[sock])
    return 2 if state.status == "failed" else 0
