import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)
# converted trunks (weights/trunk_cache.py) go to a directory of this session's, shared with the
# subprocesses it starts: a second load of a test checkpoint maps them, as a user's second load does
if "MOEMESH_TRUNK_CACHE" not in os.environ:
    os.environ["MOEMESH_TRUNK_CACHE"] = tempfile.mkdtemp(prefix="moemesh-trunks-")
    atexit.register(shutil.rmtree, os.environ["MOEMESH_TRUNK_CACHE"], True)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> (hf_model, checkpoint_dir) for every tiny config, built once per test session."""
    from tiny import configs, make_checkpoint

    out = {}
    for name, cfg in configs().items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (make_checkpoint(cfg, d), d)
    return out



def _start_relay():
    """nostr-sdk's in-process relay on 127.0.0.1: (relay, ws url)."""
    import asyncio

    from nostr_sdk import LocalRelayBuilder

    async def start():
        r = LocalRelayBuilder().addr("127.0.0.1").build()
        await r.run()
        return r, str(await r.url())

    return asyncio.run(start())


@pytest.fixture(scope="module")
def relay_url():
    """A local Nostr relay shared by a module's tests."""
    relay, url = _start_relay()
    assert url.startswith("ws://127.0.0.1:")
    yield url
    relay.shutdown()


@pytest.fixture
def fresh_relay():
    """A relay of its own, for tests that count what it holds."""
    relay, url = _start_relay()
    yield url
    relay.shutdown()
