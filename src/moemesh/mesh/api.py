"""The OpenAI server of a mesh node: the existing ServerState, with the pipeline model as the
engine's model (the server, engine and scheduler are unchanged)."""
from __future__ import annotations

from ..loading.loader import LoadedModel
from ..loading.source import resolve_model_path
from ..server.common.errors import APIError
from ..server.core.state import ServerConfig, ServerState
from . import peer_metrics
from .stack import MeshStack


class MeshServerState(ServerState):
    def __init__(self, config: ServerConfig, stack: MeshStack) -> None:
        super().__init__(config)
        self.stack = stack

    def _load_model(self, quant: str) -> LoadedModel:
        s, pipeline = self.stack.slice, self.stack.pipeline
        assert s is not None and pipeline is not None
        if s.tokenizer is None:
            raise APIError(500, f"{self.config.model}: no tokenizer found; the API needs one (or use --no-api)")
        path = resolve_model_path(self.config.model)
        return LoadedModel(pipeline, s.args, s.tokenizer, path, s.config)  # type: ignore[arg-type]

    def extra_metrics(self) -> str:
        pipeline, rx = self.stack.pipeline, self.stack.remote_experts
        failovers = (pipeline.failovers if pipeline is not None else 0) + (rx.failovers if rx is not None else 0)
        name = self.model_name.replace("\\", "\\\\").replace('"', '\\"')
        return peer_metrics.render(self.stack.node.stats, f'model_name="{name}"', failovers)
