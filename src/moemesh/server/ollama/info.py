"""GET /api/tags, POST /api/show, GET /api/ps, GET /api/version: what Ollama's clients ask before
they chat. One model is served; it is listed under each accepted name, tagged ``:latest``."""
from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from ...loading.source import resolve_model_path
from ...sysinfo import peak_rss_bytes
from ...tokenizer.formats.harmony import is_harmony
from ..common.errors import APIError
from ..common.openapi import BODY_ERRORS, error_responses
from ..core.state import ServerState
from .convert import model_name, tagged
from .schemas import ShowRequest
from .shapes import Running, Show, Tags, Version

OLLAMA_API_VERSION = "0.13.0"  # the Ollama API this surface follows (clients check it before using features)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


class ModelFacts:
    """Size, date and a digest of the model's files (the digest hashes names, sizes and dates:
    hashing the weights themselves would read gigabytes)."""

    def __init__(self, state: ServerState) -> None:
        try:
            path = resolve_model_path(state.config.model)
            files = _files(path)
            stats = [(str(p.relative_to(path)) if path.is_dir() else p.name, p.stat()) for p in files]
        except Exception:  # unreadable, or a mesh node's model may not be a local path
            path, stats = Path(state.config.model), []
        self.size = sum(s.st_size for _, s in stats)
        self.modified = max((s.st_mtime for _, s in stats), default=float(state.created))
        key = "\n".join(f"{n}:{s.st_size}:{s.st_mtime_ns}" for n, s in sorted(stats, key=lambda x: x[0]))
        self.digest = hashlib.sha256(key.encode()).hexdigest()
        self.format = "gguf" if path.suffix == ".gguf" else "safetensors"


def details(state: ServerState, facts: ModelFacts) -> dict[str, Any]:
    family = state.loaded.args.model_type if state.loaded is not None else ""
    return {"parent_model": "", "format": facts.format, "family": family, "families": [family] if family else [],
            "parameter_size": "", "quantization_level": state.config.quant.upper()}


def parameters_text(state: ServerState) -> str:
    """The model's recommended sampling in a Modelfile's PARAMETER spelling (Ollama's option names)."""
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty"}
    return "\n".join(f"{names[k]:<30} {v}" for k, v in state.sampling_defaults.values().items())


def capabilities(state: ServerState) -> list[str]:
    tok = state.ready_tokenizer()
    caps = ["completion", "tools"]  # every template gets tools (Hermes' prompt where it has none)
    if is_harmony(tok) or "<think>" in (tok.chat_template or "") or "enable_thinking" in (tok.chat_template or ""):
        caps.append("thinking")
    if state.loaded is not None and state.loaded.images is not None:
        caps.append("vision")
    return caps


def info_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    def entries() -> list[dict[str, Any]]:
        facts = ModelFacts(state)
        return [{"name": tagged(n), "model": tagged(n), "modified_at": _iso(facts.modified), "size": facts.size,
                 "digest": facts.digest, "details": details(state, facts)}
                for n in (state.model_name, *state.config.model_aliases)]

    @router.get("/api/tags", response_model=None, responses={200: {"model": Tags}, **error_responses(401, ollama=True)})
    async def tags() -> dict[str, Any]:
        """The served model, under each of its names."""
        return {"models": entries()}

    @router.get("/api/ps", response_model=None, responses={200: {"model": Running}, **error_responses(401, ollama=True)})
    async def ps() -> dict[str, Any]:
        """The loaded model (none while loading); size is this process's peak resident memory."""
        if state.status != "ready":
            return {"models": []}
        expires = _iso((datetime.now(UTC) + timedelta(days=3650)).timestamp())  # loaded for good
        return {"models": [{**e, "size": peak_rss_bytes(), "expires_at": expires, "size_vram": 0,
                            "context_length": state.context_length} for e in entries()[:1]]}

    @router.post("/api/show", response_model=None, responses={
        200: {"model": Show}, **error_responses(*BODY_ERRORS, ollama=True)})
    async def show(body: ShowRequest) -> dict[str, Any]:
        """The model's template, recommended sampling (parameters), details and capabilities."""
        name = body.model or body.name
        if name is None:
            raise APIError(400, "missing required field 'model'", param="model")
        model_name(state, name)
        tok = state.ready_tokenizer()
        facts = ModelFacts(state)
        arch = state.loaded.args.model_type if state.loaded is not None else ""
        params = parameters_text(state)
        modelfile = f"FROM {state.config.model}\n" + "".join(
            f"PARAMETER {p}\n" for p in params.splitlines())
        return {"modelfile": modelfile, "parameters": params, "template": tok.chat_template or "",
                "details": details(state, facts), "capabilities": capabilities(state), "modified_at": _iso(facts.modified),
                "model_info": {"general.architecture": arch, f"{arch}.context_length": state.context_length,
                               "moemesh.sampling_defaults": state.sampling_defaults.values()}}

    @router.get("/api/version", response_model=None, responses={200: {"model": Version}, **error_responses(401, ollama=True)})
    async def version() -> dict[str, str]:
        """The Ollama API version this server follows."""
        return {"version": OLLAMA_API_VERSION}

    return router
