"""Fuzzing what a mesh node parses from others: invites (mesh/discovery/invite.py), Nostr listings
(mesh/discovery/nostr_listing.py) and mesh messages (mesh/transport/wire.py).

Invites: any text, valid invites with characters flipped, cut or inserted, and payloads with a
valid checksum around arbitrary JSON (the checksum is no secret: a hostile invite has a right one).
Listings: content JSON edited field by field, any text, deeply nested JSON; signed events with
random kinds, tags and content. Messages: headers of random msgpack or bytes, tensors with random
dtypes, shapes and buffers. Each ends accepted or in the module's own error (InviteError,
ListingError, WireError: MoemeshErrors) naming the field; never another exception or a hang.
"""
from __future__ import annotations

import base64
import json

import msgpack
import pytest
from hivemind.proto import runtime_pb2
from hypothesis import given
from hypothesis import strategies as st
from nostr_sdk import EventBuilder, Keys, Kind, Tag, Timestamp

from fuzz_support import Tally, fuzz_settings, guarded
from moemesh.mesh.discovery.invite import Invite, _checksum
from moemesh.mesh.discovery.nostr_listing import build_event, make_content, mesh_id, parse_content, parse_listing
from moemesh.mesh.transport.wire import pack_request, unpack

NUMBERS = st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**400]) | st.integers()
JUNK = st.recursive(st.none() | st.booleans() | st.floats() | NUMBERS | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)
DEEP = st.integers(1, 20000).map(lambda n: "[" * n + "]" * n) | st.integers(1, 20000).map(lambda n: '{"a":' * n + "1" + "}" * n)
VALID = Invite("fuzz-mesh", "s3cret-s3cret-s3cret", ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.2/tcp/4002"])


def signed(payload: bytes) -> str:
    text = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"moemesh1:{text}.{_checksum(text)}"


def mutated(text: str, ops: list[tuple[str, int, str]]) -> str:
    for op, at, ch in ops:
        at %= max(1, len(text))
        text = text[:at] + ch + text[at + 1:] if op == "set" else text[:at] if op == "cut" else text[:at] + ch + text[at:]
    return text


INVITES = st.one_of(
    st.text(max_size=200),
    st.lists(st.tuples(st.sampled_from(["set", "cut", "insert"]), st.integers(0, 400), st.characters()), min_size=1,
             max_size=3).map(lambda ops: mutated(VALID.encode(), ops)),
    JUNK.map(lambda d: signed(json.dumps(d).encode())),
    DEEP.map(lambda s: signed(s.encode())),
    st.binary(max_size=64).map(signed),
    st.fixed_dictionaries({"mesh": JUNK, "secret": JUNK, "addrs": JUNK}).map(lambda d: signed(json.dumps(d).encode())),
    st.builds(Invite, st.text(min_size=1, max_size=20).filter(str.strip), st.text(max_size=40),
              st.lists(st.text(min_size=1, max_size=30), max_size=3)).map(Invite.encode),
)


def fuzz_invites(examples: int | None = None) -> Tally:
    tally = Tally("invite")

    @fuzz_settings(examples)
    @given(text=INVITES)
    def case(text: str) -> None:
        inv = guarded(tally, "invite", lambda: Invite.decode(text))
        if inv is not None:  # what decodes re-encodes to an invite that decodes the same
            assert Invite.decode(inv.encode()) == inv

    case()
    tally.report()
    return tally


def listing_json() -> dict:
    c = make_content(mesh_id("fuzz-mesh", VALID.secret), VALID, True, models_served=["qwen"], node_count=2,
                     ram_bytes=8, free_bytes=4)
    return json.loads(c.to_json())


def paths(x: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(x, dict):
        for k, v in x.items():
            out += paths(v, prefix + (k,))
    return out


@st.composite
def contents(draw) -> str:
    kind = draw(st.sampled_from(["valid", "edit", "edit", "text", "deep"]))
    if kind == "valid":  # well-formed content with arbitrary values where the format allows any
        doc = listing_json()
        doc["models"] = {"served": draw(st.lists(st.text(min_size=1, max_size=20), max_size=4)),
                         "wanted": draw(st.lists(st.text(min_size=1, max_size=20), max_size=4))}
        doc["nodes"] = draw(st.integers(1, 2**70))
        doc["capacity"] = {"ram_bytes": draw(st.integers(0, 2**70)), "free_bytes": draw(st.integers(0, 2**70))}
        return json.dumps(doc)
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "deep":
        return draw(DEEP)
    doc = listing_json()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(doc)))
        value = draw(JUNK | INVITES)
        if not path:
            doc = value
            break
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = value
        if not isinstance(doc, dict):
            break
    return json.dumps(doc)


def fuzz_listings(examples: int | None = None) -> Tally:
    tally = Tally("nostr listing")
    keys = Keys.generate()

    @fuzz_settings(examples)
    @given(text=contents(), kind=st.sampled_from([31990, 31990, 1, 30000]),
           tags=st.lists(st.tuples(st.sampled_from(["d", "k", "expiration", "x"]), st.text(max_size=20)), max_size=4),
           as_event=st.booleans())
    def case(text: str, kind: int, tags: list, as_event: bool) -> None:
        if not as_event:
            guarded(tally, "", lambda: parse_content(text, "mesh-id"))
            return
        built = [Tag.custom(name, [value]) for name, value in tags]
        event = EventBuilder(Kind(kind), text).tags(built).custom_created_at(Timestamp.from_secs(1000)).finalize(keys)
        guarded(tally, "", lambda: parse_listing(event, now=500))

    case()
    tally.report()
    # and a valid one still parses
    assert parse_listing(build_event(keys, make_content(mesh_id("m", "s"), VALID, False), 60)).content.mesh_name
    return tally


TENSORS = st.builds(lambda dtype, size, buf: runtime_pb2.Tensor(dtype=dtype, size=size, buffer=buf),
                    st.sampled_from(["fp32", "bf16", "fp16", "i64", "i32", "int8", "", "fp64"]) | st.text(max_size=5),
                    st.lists(st.sampled_from([0, 1, 2, 3, 4, 2**16, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1),
                             max_size=5),
                    st.binary(max_size=64))
PACKABLE = st.recursive(st.none() | st.booleans() | st.floats() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=12)
                        | st.binary(max_size=12),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=10)
HEADERS = st.one_of(PACKABLE.map(msgpack.packb), st.binary(max_size=64),
                    st.dictionaries(st.text(max_size=5), PACKABLE, max_size=3).map(msgpack.packb))


def fuzz_wire(examples: int | None = None) -> Tally:
    tally = Tally("mesh wire")
    seed = pack_request({"op": "step", "n": 1}, []).SerializeToString()

    @fuzz_settings(examples)
    @given(header=HEADERS, tensors=st.lists(TENSORS, max_size=3), flips=st.lists(
        st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=2), reply=st.booleans())
    def case(header: bytes, tensors: list, flips: list, reply: bool) -> None:
        cls = runtime_pb2.ExpertResponse if reply else runtime_pb2.ExpertRequest
        msg = cls(metadata=header, tensors=tensors)
        if flips:  # flipped bytes that still parse as a message
            data = bytearray(msg.SerializeToString() or seed)
            for at, x in flips:
                data[at % len(data)] ^= x
            try:
                msg = cls.FromString(bytes(data))
            except Exception:  # protobuf's DecodeError: hivemind's framing refuses it before we see it
                return
        out = guarded(tally, "", lambda: unpack(msg))
        if out is not None:
            assert isinstance(out[0], dict)

    case()
    tally.report()
    return tally


def test_invite_fuzz():
    assert fuzz_invites().outcomes["InviteError"] > 0


def test_listing_fuzz():
    tally = fuzz_listings()
    assert tally.outcomes["ListingError"] > 0 and tally.outcomes["ok"] > 0


def test_wire_fuzz():
    tally = fuzz_wire()
    assert tally.outcomes["WireError"] > 0 and tally.outcomes["ok"] > 0


@pytest.mark.slow
def test_mesh_parsers_fuzz_long():
    fuzz_invites(3000)
    fuzz_listings(2000)
    fuzz_wire(3000)
