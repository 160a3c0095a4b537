import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> (hf_model, checkpoint_dir) for every tiny config, built once per test session."""
    from tiny import configs, make_checkpoint

    out = {}
    for name, cfg in configs().items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (make_checkpoint(cfg, d), d)
    return out
