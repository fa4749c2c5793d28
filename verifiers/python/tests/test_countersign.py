"""Countersigned calls (four eyes, checks C1-C5), on both integrations behind real uvicorn
servers: an API that requires countersigners serves a call only when ``Countersign-Tokens``
carries valid tokens of enough distinct others, for the same call and key; the handler learns
who they were. An API that requires none ignores the header. Real tokens of alice, bob and carol
come from the peer; the ones no authorization server issues on demand (expired, another entry,
...) are signed by the local test key, trusted next to the peer's."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import httpx
import pytest
from apps import asgi_app, fastapi_app
from conftest import BODY, Api, World
from cryptography.hazmat.primitives.asymmetric import rsa
from support import (
    AUDIENCE,
    TokenSpec,
    UvicornThread,
    b64url_sha256,
    binding,
    dpop_proof,
    issue_tokens,
    new_ec_key,
)
from test_integration import refused, send

from countersign_verify import Verifier
from countersign_verify._core import _ordinal

TARGET = "/shop?x=1"


@dataclass
class Setup:
    api: Api  # requires 2 countersigners
    lenient: Api  # the session's API, which requires none
    dpop_key: object
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def setups(world: World):
    dpop_key, other_key = new_ec_key(), new_ec_key()
    built, specs, servers = {}, {}, []
    try:
        for name, build in (("asgi", asgi_app), ("fastapi", fastapi_app)):
            calls: list[str] = []
            app = build(calls, world.jwks.uri, world.peer.issuer, AUDIENCE, required_countersigners=2)
            server = UvicornThread(app)
            servers.append(server)
            api = Api(name, server, calls, httpx.Client(timeout=10))
            lenient = world.apis[name]
            api.bindings = {
                "main": binding("POST", TARGET, api.host, BODY),
                "dpop": binding("POST", TARGET, api.host, BODY),
            }
            lenient.bindings["countersign_lenient"] = binding("POST", TARGET, lenient.host, BODY)
            main, dpop = [api.bindings["main"]], [api.bindings["dpop"]]
            specs.update({
                f"{name}:alice": TokenSpec(details=main),
                f"{name}:bob": TokenSpec(details=main, user="bob"),
                f"{name}:carol": TokenSpec(details=main, user="carol"),
                f"{name}:alice_dpop": TokenSpec(details=dpop, dpop_key=dpop_key),
                f"{name}:bob_dpop": TokenSpec(details=dpop, dpop_key=dpop_key, user="bob"),
                f"{name}:carol_dpop": TokenSpec(details=dpop, dpop_key=dpop_key, user="carol"),
                f"{name}:bob_other_key": TokenSpec(details=dpop, dpop_key=other_key, user="bob"),
                f"{name}:alice_lenient": TokenSpec(details=[lenient.bindings["countersign_lenient"]]),
            })
            built[name] = (api, lenient)
        tokens = issue_tokens(world.peer, specs)
        yield {
            name: Setup(api, lenient, dpop_key, {
                k.split(":", 1)[1]: t.access_token for k, t in tokens.items() if k.startswith(name + ":")
            })
            for name, (api, lenient) in built.items()
        }
    finally:
        for api, _ in built.values():
            api.http.close()
        for server in servers:
            server.close()


@pytest.fixture(params=["asgi", "fastapi"])
def s(request, setups) -> Setup:
    return setups[request.param]


def dave(world: World, entry: dict, key: object = None, kid: str | None = None, **changes) -> str:
    """A countersign token of dave, signed by the local test key (or ``key``), changed as given."""
    now = int(time.time())
    claims = {"iss": world.peer.issuer, "aud": AUDIENCE, "sub": "dave", "scope": "product:buy",
              "iat": now, "exp": now + 300, "authorization_details": [entry], **changes}
    return world.jwks.sign(claims, key=key, kid=kid)


def call(s: Setup, *countersign: str, person: str = "alice") -> httpx.Response:
    """The bound call with the person's token as Bearer and ``countersign`` in one field."""
    headers = [("Countersign-Tokens", ", ".join(countersign))]
    return send(s.api, "POST", TARGET, s.tokens[person], headers=headers)


def dpop_call(s: Setup, *countersign: str) -> httpx.Response:
    token = s.tokens["alice_dpop"]
    proof = dpop_proof(s.dpop_key, "POST", s.api.url("/shop"), token)
    headers = [("DPoP", proof), ("Countersign-Tokens", ",".join(countersign))]
    return send(s.api, "POST", TARGET, token, scheme="DPoP", headers=headers)


def countersign_refused(s: Setup, response: httpx.Response, code: str, field: str | None = None) -> dict:
    return refused(s.api, response, len(s.api.calls), 403, code, field)


def test_required_countersigners_is_a_whole_number() -> None:
    options = {"issuer": "https://as.example", "audience": AUDIENCE, "jwks_uri": "https://as.example/jwks"}
    assert Verifier(**options).required_countersigners == 0
    for wrong in (-1, 1.5, True):
        with pytest.raises(ValueError, match="required_countersigners"):
            Verifier(**options, required_countersigners=wrong)


def test_ordinals() -> None:
    got = [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111, 112)]
    assert got == ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd",
                   "101st", "111th", "112th"]


def test_serves_a_call_two_others_countersigned_once(s: Setup) -> None:
    n = len(s.api.calls)
    r = call(s, s.tokens["bob"], s.tokens["carol"])
    assert r.status_code == 200, r.text
    assert r.json()["subject"] == "alice"
    assert r.json()["countersigners"] == ["bob", "carol"]
    assert s.api.calls[n:] == [s.api.bindings["main"]["approval"]]
    # Only the person's approval id is remembered, and it is.
    refused(s.api, call(s, s.tokens["bob"], s.tokens["carol"]), n + 1, 403, "approval_replayed")


def test_refuses_a_call_without_countersign_tokens(s: Setup) -> None:
    alice = s.tokens["alice"]
    countersign_refused(s, send(s.api, "POST", TARGET, alice), "countersign_missing")
    empty_list = [("Countersign-Tokens", ",,")]
    countersign_refused(s, send(s.api, "POST", TARGET, alice, headers=empty_list), "countersign_missing")
    two_fields = [("Countersign-Tokens", s.tokens["bob"]), ("Countersign-Tokens", s.tokens["carol"])]
    problem = countersign_refused(
        s, send(s.api, "POST", TARGET, alice, headers=two_fields), "countersign_missing"
    )
    assert problem["title"] == "Countersignatures missing"


def test_refuses_a_countersign_token_that_is_not_valid(s: Setup, world: World) -> None:
    entry, bob = s.api.bindings["main"], s.tokens["bob"]
    expired = dave(world, entry, exp=int(time.time()) - 120)
    problem = countersign_refused(s, call(s, bob, expired), "countersign_invalid", "token")
    assert problem["title"] == "Countersignature invalid"
    assert problem["detail"] == "The 2nd countersign token: the access token has expired."
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    unknown_key = dave(world, entry, key=stranger, kid="unknown-key")
    countersign_refused(s, call(s, unknown_key, bob), "countersign_invalid", "token")
    forged = dave(world, entry, key=stranger)  # the local key's kid, another key's signature
    countersign_refused(s, call(s, forged, bob), "countersign_invalid", "token")
    countersign_refused(s, call(s, bob, "garbage"), "countersign_invalid", "token")
    read_only = dave(world, entry, scope="product:read")
    countersign_refused(s, call(s, bob, read_only), "countersign_invalid", "token")


def test_refuses_a_countersign_token_for_another_call(s: Setup, world: World) -> None:
    entry, bob = s.api.bindings["main"], s.tokens["bob"]
    other_body = dave(world, {**entry, "body_sha256": b64url_sha256(b"{}")})
    countersign_refused(s, call(s, bob, other_body), "countersign_invalid", "binding")
    other_approval = dave(world, {**entry, "approval": str(uuid.uuid4())})
    countersign_refused(s, call(s, other_approval, s.tokens["carol"]), "countersign_invalid", "binding")
    with_tool = dave(world, {**entry, "tool": "buy"})
    countersign_refused(s, call(s, bob, with_tool), "countersign_invalid", "binding")
    # Every token is verified (C2) before any binding is compared (C3).
    expired = dave(world, entry, exp=int(time.time()) - 120)
    countersign_refused(s, call(s, other_body, expired), "countersign_invalid", "token")


def test_the_approvers_own_token_and_repeats_do_not_count(s: Setup) -> None:
    bob = s.tokens["bob"]
    problem = countersign_refused(s, call(s, s.tokens["alice"], bob), "countersign_insufficient")
    assert problem["title"] == "Too few countersigners"
    assert problem["detail"] == "2 distinct countersigners besides alice are required; the call carries 1."
    countersign_refused(s, call(s, bob, bob), "countersign_insufficient")


def test_countersign_tokens_must_be_bound_to_the_approvers_key(s: Setup, world: World) -> None:
    bound = dave(world, s.api.bindings["main"], cnf={"jkt": "some-other-thumbprint"})
    countersign_refused(s, call(s, s.tokens["bob"], bound), "countersign_invalid", "key")
    bob_dpop = s.tokens["bob_dpop"]
    countersign_refused(s, dpop_call(s, bob_dpop, s.tokens["bob_other_key"]), "countersign_invalid", "key")
    unbound = dave(world, s.api.bindings["dpop"])
    countersign_refused(s, dpop_call(s, bob_dpop, unbound), "countersign_invalid", "key")
    # The approver's own token and a repeat besides: still two others.
    n = len(s.api.calls)
    carol_dpop = s.tokens["carol_dpop"]
    r = dpop_call(s, carol_dpop, s.tokens["alice_dpop"], bob_dpop, carol_dpop)
    assert r.status_code == 200, r.text
    assert r.json()["countersigners"] == ["carol", "bob"]
    assert s.api.calls[n:] == [s.api.bindings["dpop"]["approval"]]


def test_no_required_countersigners_ignores_the_header(s: Setup) -> None:
    api = s.lenient
    n = len(api.calls)
    garbage = [("Countersign-Tokens", "garbage, ,"), ("Countersign-Tokens", "more")]
    r = send(api, "POST", TARGET, s.tokens["alice_lenient"], headers=garbage)
    assert r.status_code == 200, r.text
    assert r.json()["countersigners"] == []
    assert api.calls[n:] == [api.bindings["countersign_lenient"]["approval"]]
