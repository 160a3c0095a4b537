"""The JSON files beside a model: missing or unparsable ones are CheckpointErrors naming the file."""
from __future__ import annotations

import pytest

from moemesh.errors import CheckpointError
from moemesh.loading.source import open_source
from moemesh.store.expert_store import ExpertStore


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00garbage"])
def test_bad_config_json_names_the_file(tmp_path, body):
    (tmp_path / "config.json").write_bytes(body)
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        open_source(tmp_path)


def test_missing_config_says_what_the_directory_lacks(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        open_source(tmp_path)


@pytest.mark.parametrize("body", [b"[1, 2", b"\x80\x81"])
def test_bad_manifest_names_the_file(tmp_path, body):
    (tmp_path / "manifest.json").write_bytes(body)
    with pytest.raises(CheckpointError, match=r"manifest\.json: corrupt manifest"):
        ExpertStore(tmp_path)
    with pytest.raises(CheckpointError, match="not an expert store"):
        ExpertStore(tmp_path / "elsewhere")
