import base64
import json

import pytest

from moemesh.errors import MoemeshError
from moemesh.mesh.discovery.invite import PREFIX, Invite, new_secret

ADDRS = ["/ip4/127.0.0.1/tcp/40123/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"]


def test_roundtrip():
    inv = Invite("homelab", new_secret(), list(ADDRS))
    text = inv.encode()
    assert text.startswith(PREFIX)
    assert " " not in text and "\n" not in text
    back = Invite.decode(text)
    assert back == inv


def test_encode_is_canonical():
    a = Invite("m", "s", ["/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/2"])
    b = Invite.from_dict({"addrs": ["/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/2"], "secret": "s", "mesh": "m"})
    assert a.encode() == b.encode()


def test_decode_tolerates_whitespace_from_copy_paste():
    text = Invite("m", "s", ADDRS).encode()
    wrapped = "  " + text[:20] + "\n" + text[20:] + "\n"
    assert Invite.decode(wrapped) == Invite("m", "s", ADDRS)


def test_secret_is_fresh_and_urlsafe():
    a, b = new_secret(), new_secret()
    assert a != b and len(a) >= 32
    assert all(c.isalnum() or c in "-_" for c in a)


@pytest.mark.parametrize("pos", [len(PREFIX) + 3, -10, -2])
def test_single_character_typo_is_caught(pos):
    text = list(Invite("homelab", "sekrit", ADDRS).encode())
    text[pos] = "A" if text[pos] != "A" else "B"  # in the payload, or in the checksum itself
    with pytest.raises(ValueError, match="checksum"):
        Invite.decode("".join(text))


def test_truncated_invite_is_caught():
    text = Invite("homelab", "sekrit", ADDRS).encode()
    with pytest.raises(ValueError, match="checksum|truncated"):
        Invite.decode(text[:-8])


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "does not start"),
        ("hello", "does not start"),
        ("moemesh1:", "missing checksum"),
        ("moemesh1:abc", "missing checksum"),
    ],
)
def test_bad_input_messages(text, match):
    with pytest.raises(ValueError, match=match) as ei:
        Invite.decode(text)
    assert isinstance(ei.value, MoemeshError)


def _forge(obj) -> str:
    """A correctly checksummed invite around an arbitrary payload (to test field validation)."""
    from moemesh.mesh.discovery.invite import _b64encode, _checksum

    payload = _b64encode(json.dumps(obj).encode())
    return f"{PREFIX}{payload}.{_checksum(payload)}"


@pytest.mark.parametrize(
    "obj,match",
    [
        ([1, 2], "not a JSON object"),
        ({"mesh": "m", "secret": "s"}, "lacks field"),
        ({"mesh": "", "secret": "s", "addrs": []}, "mesh name"),
        ({"mesh": "m", "secret": 3, "addrs": []}, "secret"),
        ({"mesh": "m", "secret": "s", "addrs": "x"}, "addrs"),
        ({"mesh": "m", "secret": "s", "addrs": [""]}, "addrs"),
    ],
)
def test_bad_fields(obj, match):
    with pytest.raises(ValueError, match=match):
        Invite.decode(_forge(obj))


def test_non_json_payload():
    from moemesh.mesh.discovery.invite import _checksum

    payload = base64.urlsafe_b64encode(b"\xff\xfe not json").decode().rstrip("=")
    with pytest.raises(ValueError, match="base64 JSON"):
        Invite.decode(f"{PREFIX}{payload}.{_checksum(payload)}")


def test_without_secret():
    inv = Invite("m", "s", ADDRS)
    assert inv.without_secret() == Invite("m", "", ADDRS)
