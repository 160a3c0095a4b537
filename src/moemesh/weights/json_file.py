"""Reading the small JSON files beside a model (config.json, an expert store's manifest): a missing
or unparsable file is a CheckpointError naming it, never a traceback."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError


def read_json(path: Path, missing: str, corrupt: str = "invalid JSON") -> Any:
    """The parsed file. ``missing``: the whole message when it does not exist; ``corrupt``: what to
    call it when it does not parse (the parser's reason follows)."""
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # deep nesting too
        raise CheckpointError(f"{path}: {corrupt} ({exc})") from None
