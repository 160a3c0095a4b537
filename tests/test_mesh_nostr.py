"""Nostr discovery against nostr-sdk's in-process relay on 127.0.0.1 (no network beyond it)."""
import argparse
import asyncio
import json
import logging
import socket
import stat
import time

import pytest
from nostr_sdk import Event, Keys

from moemesh.errors import MoemeshError
from moemesh.mesh.discovery import join as discovery  # listings: fetch, rank, auto_join
from moemesh.mesh.discovery import nostr_relays
from moemesh.mesh.discovery.invite import Invite, new_secret
from moemesh.mesh.discovery.nostr_keys import load_or_create_keys
from moemesh.mesh.discovery.nostr_listing import (
    Listing,
    ListingContent,
    ListingError,
    build_event,
    make_content,
    mesh_id,
    parse_content,
    parse_listing,
    parse_listings,
)
from moemesh.mesh.discovery.nostr_publisher import ListingPublisher

FAST = nostr_relays.RetryPolicy(attempts=3, connect_timeout_s=0.5, base_delay_s=0.1, max_delay_s=0.4)
GIB = 2**30


def content(name: str, served=(), wanted=(), nodes=1, free_gib=8, open_=True, secret=None) -> ListingContent:
    secret = secret or new_secret()
    inv = Invite(name, secret, [f"/ip4/127.0.0.1/tcp/{4000 + len(name)}"])
    return make_content(mesh_id(name, secret), inv, open_, models_served=list(served), models_wanted=list(wanted),
                        node_count=nodes, ram_bytes=2 * free_gib * GIB, free_bytes=free_gib * GIB)


def publish(url: str, keys: Keys, c: ListingContent, ttl_s: int = 60, created_at: int | None = None) -> Event:
    ev = build_event(keys, c, ttl_s, created_at)

    async def go():
        client, connected = await nostr_relays.connect([url], FAST)
        try:
            return await nostr_relays.send(client, connected, ev, 2.0)
        finally:
            await client.shutdown()

    assert asyncio.run(go()) == [url]
    return ev


def raw_events(url: str, d_tag: str | None = None) -> list[Event]:
    async def go():
        client, connected = await nostr_relays.connect([url], FAST)
        try:
            return await nostr_relays.fetch(client, connected, discovery.listing_filter(), 2.0)
        finally:
            await client.shutdown()

    evs = asyncio.run(go())
    return [e for e in evs if d_tag is None or any(t.to_vec()[:2] == ["d", d_tag] for t in e.tags())]


# --- keys -------------------------------------------------------------------------------------

def test_key_created_0600_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path / "home"))
    k1 = load_or_create_keys()
    path = tmp_path / "home" / "nostr.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("nsec1")
    k2 = load_or_create_keys()
    assert k1.public_key().to_hex() == k2.public_key().to_hex()
    explicit = load_or_create_keys(tmp_path / "other.key")
    assert explicit.public_key().to_hex() != k1.public_key().to_hex()
    assert stat.S_IMODE((tmp_path / "other.key").stat().st_mode) == 0o600


def test_key_loose_mode_is_restricted_and_garbage_is_a_clear_error(tmp_path):
    p = tmp_path / "k"
    k = load_or_create_keys(p)
    p.chmod(0o644)
    assert load_or_create_keys(p).public_key().to_hex() == k.public_key().to_hex()
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    p.write_text("not a key\n")
    with pytest.raises(MoemeshError, match="not a valid secret key"):
        load_or_create_keys(p)


# --- listing parser -----------------------------------------------------------------------------

def test_listing_secret_only_when_published():
    inv = Invite("m", "s3cret", ["/ip4/127.0.0.1/tcp/1"])
    private = make_content("id", inv, publish_secret=False)
    assert "s3cret" not in private.to_json() and not private.open
    public = make_content("id", inv, publish_secret=True)
    assert public.open and Invite.decode(json.loads(public.to_json())["invite"]).secret == "s3cret"


def test_tampered_event_is_rejected(caplog):
    ev = build_event(Keys.generate(), content("lab", served=["m"]), 60)
    assert parse_listing(ev).content.mesh_name == "lab"
    d = json.loads(ev.as_json())
    d["content"] = d["content"].replace('"nodes":1', '"nodes":99')
    forged = Event.from_json(json.dumps(d))
    with pytest.raises(ListingError, match="signature"):
        parse_listing(forged)
    with caplog.at_level(logging.INFO, logger="moemesh.mesh.discovery.nostr_listing"):
        assert parse_listings([forged, ev]) and len(parse_listings([forged])) == 0
    assert "tampered" in caplog.text


def test_expired_listing_is_rejected():
    now = int(time.time())
    ev = build_event(Keys.generate(), content("old"), ttl_s=30, created_at=now - 60)
    with pytest.raises(ListingError, match="expired"):
        parse_listing(ev)
    assert parse_listing(ev, now=now - 45).content.mesh_name == "old"


@pytest.mark.parametrize("text,match", [
    ("nope", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"v": 2}', "version"),
    ('{"v": 1, "mesh": "m"}', "lacks"),
    ('{"v":1,"mesh":"m","invite":"moemesh1:xx.yy","open":false,"models":{},"nodes":1,"capacity":{}}', "bad invite"),
    ("x" * 20000, "larger"),
])
def test_malformed_content_is_rejected(text, match):
    with pytest.raises(ListingError, match=match):
        parse_content(text, "id")


def test_malformed_fields_are_rejected():
    good = json.loads(content("m", served=["a"]).to_json())
    for key, value, match in [("nodes", -1, "nodes"), ("nodes", 0, "at least 1"), ("open", False, "open"),
                              ("mesh", "other", "names mesh"), ("models", {"served": [1]}, "served"),
                              ("capacity", {"free_bytes": "lots"}, "free_bytes")]:
        bad = dict(good, **{key: value})
        with pytest.raises(ListingError, match=match):
            parse_content(json.dumps(bad), "id")


# --- scoring ------------------------------------------------------------------------------------

def _listing(c: ListingContent, age_s: float = 0, ttl_s: int = 180, now: float = 1e9) -> Listing:
    return Listing(c, author="a" * 64, created_at=int(now - age_s), expires_at=int(now - age_s + ttl_s), event_id="e")


def test_scoring_prefers_model_then_capacity_then_freshness():
    now = 1e9
    a = _listing(content("a", served=["Qwen/Qwen3-30B-A3B"], free_gib=4), now=now)
    b = _listing(content("b", served=["olmoe"], free_gib=64, nodes=8), now=now)
    c = _listing(content("c", wanted=["qwen3-30b-a3b"], free_gib=4), now=now)
    assert discovery.pick_best([b, c, a], "qwen3-30b-a3b", now).listing is a  # org/ prefix and case ignored
    assert discovery.pick_best([a, c], "olmoe", now) is None  # nobody serves or wants it
    assert discovery.pick_best([a, b], None, now).listing is b  # no model: capacity and size decide
    stale = _listing(content("s", served=["x"], free_gib=8), age_s=170, now=now)
    fresh = _listing(content("f", served=["x"], free_gib=8), age_s=1, now=now)
    assert discovery.pick_best([stale, fresh], "x", now).listing is fresh
    assert discovery.pick_best([c], "qwen3-30b-a3b", now).listing is c  # a mesh gathering nodes for it


def test_private_mesh_needs_known_secret():
    now = 1e9
    priv = _listing(content("p", served=["x"], open_=False, secret="known"), now=now)
    assert discovery.pick_best([priv], "x", now) is None
    best = discovery.pick_best([priv], "x", now, known_secrets={"p": "known"})
    assert discovery.invite_for(best, {"p": "known"}).secret == "known"


# --- against the local relay --------------------------------------------------------------------

def test_publish_two_keys_discover_and_auto_join(relay_url):
    k1, k2 = Keys.generate(), Keys.generate()
    ca = content("alpha", served=["qwen3-30b"], free_gib=16, nodes=3)
    cb = content("beta", served=["olmoe-1b-7b"], free_gib=32, nodes=2)
    publish(relay_url, k1, ca)
    publish(relay_url, k2, cb)
    found = {lst.content.mesh_name: lst for lst in discovery.discover([relay_url], 2.0, FAST)}
    assert found["alpha"].author == k1.public_key().to_hex()
    assert found["beta"].author == k2.public_key().to_hex()
    assert found["beta"].content == cb
    assert discovery.auto_join([relay_url], model="qwen3-30b", timeout_s=2.0, policy=FAST) == ca.invite
    assert discovery.auto_join([relay_url], model="olmoe-1b-7b", timeout_s=2.0, policy=FAST) == cb.invite
    assert discovery.auto_join([relay_url], model="no-such-model", timeout_s=2.0, policy=FAST) is None


def test_replaceable_update_replaces_old_content(fresh_relay):
    keys = Keys.generate()
    secret = new_secret()
    now = int(time.time())
    publish(fresh_relay, keys, content("rep", nodes=1, secret=secret), created_at=now - 1)
    publish(fresh_relay, keys, content("rep", nodes=5, secret=secret), created_at=now)
    evs = raw_events(fresh_relay, mesh_id("rep", secret))
    assert len(evs) == 1  # the relay dropped the older event
    (lst,) = discovery.discover([fresh_relay], 2.0, FAST)
    assert lst.content.node_count == 5


def test_expired_listing_ignored_even_if_relay_serves_it(fresh_relay):
    keys = Keys.generate()
    publish(fresh_relay, keys, content("short"), ttl_s=30)
    evs = raw_events(fresh_relay)
    assert [x.content.mesh_name for x in parse_listings(evs)] == ["short"]
    assert parse_listings(evs, now=time.time() + 31) == []  # a relay ignoring NIP-40 changes nothing


def test_publisher_republishes_fresh_content(fresh_relay):
    rounds = []

    def content_fn():
        rounds.append(1)
        return make_content("pub-id", Invite("pub", "s", ["/ip4/127.0.0.1/tcp/9"]), True, node_count=len(rounds))

    pub = ListingPublisher(Keys.generate(), [fresh_relay], content_fn, interval_s=0.2, policy=FAST).start_thread()
    try:
        deadline = time.time() + 5
        while pub.published < 3 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        pub.stop()
    assert pub.published >= 3 and pub.ttl_s >= 2
    (lst,) = discovery.discover([fresh_relay], 2.0, FAST)
    assert lst.content.node_count >= 3  # the latest round's content replaced the earlier ones


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_relay_is_a_clear_error_after_bounded_retries(relay_url, caplog):
    silent = socket.socket()  # accepts TCP (kernel backlog) but never speaks websocket
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    dead = f"ws://127.0.0.1:{_free_port()}"
    mute = f"ws://127.0.0.1:{silent.getsockname()[1]}"
    try:
        t0 = time.time()
        with pytest.raises(nostr_relays.RelayUnreachable, match="after 3 attempt") as ei:
            discovery.discover([dead, mute], 1.0, FAST)
        took = time.time() - t0
        assert dead in str(ei.value) and mute in str(ei.value)
        assert took < FAST.worst_case_s() + 2.0, took
        with caplog.at_level(logging.WARNING):
            assert discovery.auto_join([dead], model="x", timeout_s=1.0, policy=FAST) is None
        assert "starting a new mesh" in caplog.text
        # one dead relay beside a live one: the live one still answers, quickly
        t0 = time.time()
        discovery.discover([dead, relay_url], 2.0, FAST)
        assert time.time() - t0 < 2.5
    finally:
        silent.close()


def test_bad_relay_url_is_a_clear_error():
    with pytest.raises(MoemeshError, match="ws://"):
        discovery.discover(["http://127.0.0.1:1"], 1.0, FAST)


# --- CLI ----------------------------------------------------------------------------------------

def _cli(argv: list[str]) -> int:
    from moemesh.commands import mesh_discovery

    parser = argparse.ArgumentParser(prog="moemesh mesh")
    mesh_discovery.add_subcommands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_discover_and_invite(relay_url, tmp_path, monkeypatch, capsys):
    ca = content("cli-mesh", served=["tiny-moe"], free_gib=2)
    publish(relay_url, Keys.generate(), ca)
    assert _cli(["discover", "--nostr-relay", relay_url, "--model", "tiny-moe", "--json", "--timeout", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)["listings"]
    assert rows[0]["mesh"] == "cli-mesh" and rows[0]["fits"] and Invite.decode(rows[0]["invite"]) == ca.invite
    assert _cli(["discover", "--nostr-relay", relay_url, "--model", "tiny-moe", "--auto", "--timeout", "2"]) == 0
    assert Invite.decode(capsys.readouterr().out.strip()) == ca.invite
    assert _cli(["discover", "--nostr-relay", relay_url, "--model", "absent", "--auto", "--timeout", "2"]) == 0
    assert "start a new mesh" in capsys.readouterr().out

    assert _cli(["invite", "--mesh-name", "m", "--secret", "s", "--addr", "/ip4/127.0.0.1/tcp/5"]) == 0
    assert Invite.decode(capsys.readouterr().out.strip()) == Invite("m", "s", ["/ip4/127.0.0.1/tcp/5"])
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    with pytest.raises(MoemeshError, match="no mesh node state"):
        _cli(["invite"])
    from moemesh.mesh.discovery.node_state import write_node_state

    p = write_node_state(Invite("st", "sec", ["/ip4/127.0.0.1/tcp/6"]))
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert _cli(["invite"]) == 0
    assert Invite.decode(capsys.readouterr().out.strip()) == Invite("st", "sec", ["/ip4/127.0.0.1/tcp/6"])
    with pytest.raises(MoemeshError, match="multiaddr"):
        _cli(["invite", "--mesh-name", "m", "--secret", "s", "--addr", "127.0.0.1:5"])
