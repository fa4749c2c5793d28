from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from apps import asgi_app, fastapi_app  # noqa: E402
from support import (  # noqa: E402
    AUDIENCE,
    LocalJwks,
    Peer,
    Token,
    TokenSpec,
    UvicornThread,
    binding,
    issue_tokens,
    new_ec_key,
)

BODY = b'{"item":"phone","qty":2}'


@dataclass
class Api:
    name: str
    server: UvicornThread
    calls: list[str]
    http: httpx.Client
    tokens: dict[str, Token] = field(default_factory=dict)
    bindings: dict[str, dict] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.server.host

    def url(self, target: str) -> str:
        return self.server.base_url + target


@dataclass
class World:
    peer: Peer
    jwks: LocalJwks
    apis: dict[str, Api]
    dpop_key: object


def _specs(api: Api, dpop_key: object) -> dict[str, TokenSpec]:
    h = api.host
    b = {
        "ok": binding("POST", "/shop?x=1", h, BODY),
        "get_empty": binding("GET", "/items", h, b""),
        "mismatch": binding("POST", "/shop?ref=agent", h, BODY),
        "encoded": binding("POST", "/shop/%61?q=a%20b", h, BODY),
        "read_scope": binding("POST", "/shop", h, BODY),
        "version2": {**binding("POST", "/shop", h, BODY), "version": "2"},
        "dpop_ok": binding("POST", "/shop?dpop=1", h, BODY),
        "dpop_fail": binding("POST", "/shop?dpop=2", h, BODY),
        "strict_ok": binding("POST", "/strict/buy", h, BODY),
    }
    api.bindings = b
    specs = {name: TokenSpec(details=[entry]) for name, entry in b.items()}
    specs["read_scope"].scope = "openid product:read"
    for name in ("dpop_ok", "dpop_fail", "strict_ok"):
        specs[name].dpop_key = dpop_key
    specs["unbound"] = TokenSpec(details=None)
    specs["purchase"] = TokenSpec(details=[{"type": "product_purchase", "item": "x"}])
    specs["two_entries"] = TokenSpec(
        details=[binding("POST", "/shop", h, BODY), binding("POST", "/shop", h, BODY)]
    )
    return specs


@pytest.fixture(scope="session")
def world():
    peer = Peer()
    jwks = LocalJwks(peer)
    servers = []
    try:
        apis = {}
        for name, build in (("asgi", asgi_app), ("fastapi", fastapi_app)):
            calls: list[str] = []
            server = UvicornThread(build(calls, jwks.uri, peer.issuer, AUDIENCE))
            servers.append(server)
            apis[name] = Api(name, server, calls, httpx.Client(timeout=10))
        dpop_key = new_ec_key()
        specs = {}
        for name, api in apis.items():
            specs.update({f"{name}:{k}": v for k, v in _specs(api, dpop_key).items()})
        tokens = issue_tokens(peer, specs)
        for name, api in apis.items():
            api.tokens = {k.split(":", 1)[1]: v for k, v in tokens.items() if k.startswith(name + ":")}
        yield World(peer, jwks, apis, dpop_key)
        for api in apis.values():
            api.http.close()
    finally:
        for server in servers:
            server.close()
        jwks.close()
        peer.close()


@pytest.fixture(params=["asgi", "fastapi"])
def api(request, world) -> Api:
    return world.apis[request.param]
