"""The framework-free verifier: docs/call-binding.md, version 1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt
from jwt import PyJWK, PyJWKClient
from jwt.exceptions import PyJWTError

from ._cache import SeenCache
from ._problem import Refusal, ServerError

log = logging.getLogger("countersign_verify")

#: Asymmetric JWS algorithms accepted for access tokens and DPoP proofs.
ASYMMETRIC_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
_DEFAULT_PORTS = {"http": 80, "https": 443}
BINDING_TYPE = "countersign_call"
COUNTERSIGN_HEADER = "countersign-tokens"

HeadersLike = Mapping[str, Any] | Iterable[tuple[Any, Any]]


@dataclass(frozen=True)
class Approval:
    """An accepted call: who approved it, which approval, and the token's claims."""

    subject: str
    approval_id: str
    claims: dict[str, Any]
    binding: dict[str, Any]
    #: RFC 7638 thumbprint of the DPoP key the token is bound to (``cnf.jkt``), if any.
    dpop_jkt: str | None = None
    scopes: tuple[str, ...] = field(default=())
    #: Who countersigned the call (four eyes): the distinct ``sub``s of the accepted
    #: ``Countersign-Tokens``, in header order, without the approver's own. Empty when the
    #: verifier requires no countersigners.
    countersigners: list[str] = field(default_factory=list)


def b64url_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of a public JWK."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        raise ValueError("unsupported or incomplete JWK")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url_sha256(canonical.encode())


def _header_pairs(headers: HeadersLike) -> list[tuple[str, str]]:
    """Normalise headers to (lower-case name, value) pairs, keeping repeated ones."""
    raw = getattr(headers, "raw", None)  # Starlette / httpx Headers: [(bytes, bytes)]
    if isinstance(raw, list):
        items: Iterable[tuple[Any, Any]] = raw
    elif isinstance(headers, Mapping):
        items = []
        for k, v in headers.items():
            if isinstance(v, list | tuple):
                items.extend((k, x) for x in v)  # type: ignore[union-attr]
            else:
                items.append((k, v))  # type: ignore[union-attr]
    else:
        items = headers
    out = []
    for k, v in items:
        k = k.decode("latin-1") if isinstance(k, bytes | bytearray) else str(k)
        v = v.decode("latin-1") if isinstance(v, bytes | bytearray) else str(v)
        out.append((k.lower(), v))
    return out


def _values(pairs: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in pairs if k == name]


def _normalise_url(url: str) -> tuple[str, str, int | None, str, str, str] | None:
    """Scheme and host lower-cased, default port dropped, empty path as ``/`` (RFC 3986 6.2.3)."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return None
    if not scheme or not host:
        return None
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    return scheme, host, port, parts.path or "/", parts.query, parts.fragment


@dataclass
class _Credentials:
    scheme: str  # "bearer" or "dpop"
    token: str
    header: dict[str, Any]


class _InvalidToken(Exception):
    """An access token fails check 2; the message is the refusal's detail."""


class _KeysUnavailable(Exception):
    """The authorization server's key set could not be fetched (and none was fetched before)."""


class _KeySet:
    """The authorization server's JWKS, fetched with PyJWKClient, cached, refreshed on an unknown kid."""

    def __init__(self, jwks_uri: str, lifespan: float, timeout: float, cooldown: float) -> None:
        self._client = PyJWKClient(jwks_uri, cache_jwk_set=False, cache_keys=False, timeout=timeout)
        self._lifespan = lifespan
        self._cooldown = cooldown
        self._lock = threading.Lock()
        # The key list and its parsed keys, replaced together (one atomic assignment).
        self._snapshot: tuple[list[dict[str, Any]] | None, dict[tuple[int, str], PyJWK]] = (None, {})
        self._fetched_at = 0.0
        self._attempted_at = float("-inf")

    @staticmethod
    def _select(keys: list[dict[str, Any]] | None, kid: str | None) -> list[tuple[int, dict[str, Any]]]:
        return [
            (i, k)
            for i, k in enumerate(keys or [])
            if k.get("use", "sig") == "sig" and (kid is None or k.get("kid") == kid)
        ]

    def needs_fetch(self, kid: str | None) -> bool:
        now = time.monotonic()
        keys = self._snapshot[0]
        if keys is None or now - self._fetched_at > self._lifespan:
            # No keys yet, or stale ones: at most one attempt a second (a dead JWKS endpoint
            # then gets token_invalid at once instead of stalling every request for the timeout).
            return now - self._attempted_at > 1.0
        # A kid we do not know: the AS may have rotated its keys; refetch, but not in a storm.
        return not self._select(keys, kid) and now - self._attempted_at > self._cooldown

    def fetch(self) -> None:
        """Fetch the JWKS (blocking: the async paths call this in a thread)."""
        with self._lock:
            if time.monotonic() - self._attempted_at < 0.5:
                return  # another thread fetched while this one waited for the lock
            self._attempted_at = time.monotonic()
            try:
                data = self._client.fetch_data()
                keys = data.get("keys") if isinstance(data, dict) else None
                if not isinstance(keys, list):
                    raise ValueError("no keys array")
            except Exception as exc:  # noqa: BLE001 - any failure keeps the previous keys
                log.warning("countersign_verify: JWKS fetch failed: %s", exc)
                return
            self._snapshot = ([k for k in keys if isinstance(k, dict)], {})
            self._fetched_at = self._attempted_at

    def ensure(self, kid: str | None) -> None:
        if self.needs_fetch(kid):
            self.fetch()

    def candidates(self, kid: str | None, alg: str) -> list[PyJWK]:
        keys, parsed = self._snapshot
        if keys is None:
            raise _KeysUnavailable
        out = []
        for index, jwk in self._select(keys, kid):
            if jwk.get("alg") not in (None, alg):
                continue
            key = parsed.get((index, alg))
            if key is None:
                try:
                    key = PyJWK(jwk, algorithm=alg)
                except PyJWTError:
                    continue
                parsed[(index, alg)] = key
            out.append(key)
        return out


class Verifier:
    """Checks that a request carries a token approved for exactly that request.

    ``verify`` returns an :class:`Approval` or raises a :class:`Refusal`; the checks run in the
    order of docs/call-binding.md and the first failure is the answer.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_uri: str,
        required_scopes: Sequence[str] | str = (),
        host: str | None = None,
        external_url: str | None = None,
        require_dpop: bool = False,
        dpop_window: float = 60,
        max_body_bytes: int = 10 * 1024 * 1024,
        leeway: float = 30,
        jwks_lifespan: float = 300,
        jwks_timeout: float = 10,
        jwks_refresh_cooldown: float = 10,
        required_countersigners: int = 0,
    ) -> None:
        if not issuer or not audience or not jwks_uri:
            raise ValueError("issuer, audience and jwks_uri are required")
        if (
            isinstance(required_countersigners, bool)
            or not isinstance(required_countersigners, int)
            or required_countersigners < 0
        ):
            raise ValueError("required_countersigners must be a whole number >= 0")
        if isinstance(required_scopes, str):
            required_scopes = required_scopes.split()
        self.issuer = issuer
        self.audience = audience
        self.jwks_uri = jwks_uri
        self.required_scopes = tuple(required_scopes)
        self.host = host
        self.external_url = external_url.rstrip("/") if external_url else None
        if self.external_url is not None and _normalise_url(self.external_url) is None:
            raise ValueError("external_url must be an absolute http(s) URL")
        self.require_dpop = require_dpop
        self.dpop_window = dpop_window
        self.max_body_bytes = max_body_bytes
        self.leeway = leeway
        #: Four eyes: how many people besides the approver must have countersigned the call
        #: (checks C1-C5); 0 ignores the ``Countersign-Tokens`` header entirely.
        self.required_countersigners = required_countersigners
        self._keys = _KeySet(jwks_uri, jwks_lifespan, jwks_timeout, jwks_refresh_cooldown)
        self.approvals_seen = SeenCache()
        self.dpop_jtis_seen = SeenCache()

    # -- public API -------------------------------------------------------------------------

    def verify(
        self,
        method: str,
        target: str | bytes,
        host: str | None,
        headers: HeadersLike,
        body: bytes,
        url: str | None = None,
    ) -> Approval:
        """Verify one request (blocking: may fetch the JWKS).

        ``target`` is the raw request-target as received (path and query, undecoded), ``host``
        the ``Host`` header (``None`` to take it from ``headers``), ``url`` the request URL as the
        client addressed it (for DPoP ``htu``; not needed when ``external_url`` is configured).
        """
        pairs = _header_pairs(headers)
        creds = self._credentials(pairs)
        for kid in self._kids(creds, pairs):
            self._keys.ensure(kid)
        return self._verify(creds, pairs, method, target, host, body, url)

    async def verify_async(
        self,
        method: str,
        target: str | bytes,
        host: str | None,
        headers: HeadersLike,
        body: bytes,
        url: str | None = None,
    ) -> Approval:
        """As :meth:`verify`; a JWKS fetch runs in a worker thread, off the event loop."""
        pairs = _header_pairs(headers)
        creds = self._credentials(pairs)
        for kid in self._kids(creds, pairs):
            if self._keys.needs_fetch(kid):
                await asyncio.to_thread(self._keys.fetch)
        return self._verify(creds, pairs, method, target, host, body, url)

    def _kids(self, creds: _Credentials, pairs: list[tuple[str, str]]) -> list[str | None]:
        """The key ids the checks will need: the fetch happens before them (off the event loop
        in :meth:`verify_async`), not in the middle. Unreadable countersign tokens need none:
        C1 or C2 refuses them."""
        kids = [creds.header.get("kid")]
        if self.required_countersigners:
            for token in _countersign_tokens(pairs) or []:
                try:
                    kid = jwt.get_unverified_header(token).get("kid")
                except PyJWTError:
                    continue
                if kid not in kids:
                    kids.append(kid)
        return kids

    # -- the checks -------------------------------------------------------------------------

    def _dpop_in_use(self, scheme: str | None) -> bool:
        return self.require_dpop or scheme == "dpop"

    def _credentials(self, pairs: list[tuple[str, str]]) -> _Credentials:
        # 1. exactly one Authorization: Bearer|DPoP <jwt>
        auths = _values(pairs, "authorization")
        dpop = self.require_dpop
        if len(auths) != 1:
            raise Refusal(
                "token_missing",
                "The request has no Authorization header." if not auths
                else "The request has more than one Authorization header.",
                dpop=dpop,
            )
        parts = auths[0].strip().split(" ")
        parts = [p for p in parts if p]
        if len(parts) != 2 or parts[0].lower() not in ("bearer", "dpop"):
            raise Refusal(
                "token_missing",
                "The Authorization header does not hold a Bearer or DPoP token.",
                dpop=dpop,
            )
        scheme, token = parts[0].lower(), parts[1]
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise Refusal(
                "token_invalid", "The access token is not a JWT.", dpop=self._dpop_in_use(scheme)
            ) from None
        return _Credentials(scheme, token, header)

    def _verify(
        self,
        creds: _Credentials,
        pairs: list[tuple[str, str]],
        method: str,
        target: str | bytes,
        host: str | None,
        body: bytes,
        url: str | None,
    ) -> Approval:
        dpop = self._dpop_in_use(creds.scheme)
        claims = self._check_token(creds, dpop)

        # 3. scopes
        missing = self._lacking_scopes(claims)
        if missing:
            raise Refusal(
                "insufficient_scope",
                f"The access token lacks the scope(s): {' '.join(missing)}.",
            )

        # 4. DPoP
        jkt = _bound_key(claims)
        if jkt is not None or dpop:
            self._check_dpop(creds, pairs, jkt, method, target, host, url)

        # 5. exactly one countersign_call entry
        entries = _call_entries(claims)
        if len(entries) != 1:
            raise Refusal(
                "binding_missing",
                "The access token does not name a call (no countersign_call authorization detail)."
                if not entries
                else "The access token holds more than one countersign_call authorization detail.",
            )
        entry = entries[0]
        approval_id = entry.get("approval")
        if not isinstance(approval_id, str) or not approval_id:
            raise Refusal("binding_missing", "The countersign_call entry has no approval id.")

        # 6-10. the call itself
        if entry.get("version") != "1":
            raise Refusal(
                "binding_mismatch", "The call binding is not version \"1\".", field="version"
            )
        if entry.get("method") != method:
            raise Refusal(
                "binding_mismatch",
                "The token was approved for another method than this request's.",
                field="method",
            )
        raw_target = target if isinstance(target, bytes) else target.encode("utf-8")
        bound_target = entry.get("target")
        if not isinstance(bound_target, str) or bound_target.encode("utf-8") != raw_target:
            raise Refusal(
                "binding_mismatch",
                "The token was approved for another request-target than this request's.",
                field="target",
            )
        expected_host = self.host
        if expected_host is None:
            if host is None:
                hosts = _values(pairs, "host")
                host = hosts[0] if len(hosts) == 1 else None
            expected_host = host
        bound_host = entry.get("host")
        if (
            not isinstance(bound_host, str)
            or expected_host is None
            or not bound_host.isascii()
            or not expected_host.isascii()
            or bound_host.lower() != expected_host.lower()
        ):
            raise Refusal(
                "binding_mismatch",
                "The token was approved for a call to another host.",
                field="host",
            )
        bound_digest = entry.get("body_sha256")
        if not isinstance(bound_digest, str) or not hmac.compare_digest(
            bound_digest.encode(), b64url_sha256(body).encode()
        ):
            raise Refusal(
                "binding_mismatch",
                "The token was approved for another body than this request's.",
                field="body",
            )

        # C1-C5. four eyes: enough others approved this very call. Before the replay check, so
        # a call refused here does not use up the approval.
        countersigners = self._check_countersigners(pairs, claims, entry)

        # 11. the approval is used once (only the person's approval id)
        exp = float(claims["exp"])
        if not self.approvals_seen.add(approval_id, exp + self.leeway):
            raise Refusal(
                "approval_replayed",
                "This approval was already used: an approved call is forwarded once.",
            )
        return Approval(
            subject=claims["sub"],
            approval_id=approval_id,
            claims=claims,
            binding=dict(entry),
            dpop_jkt=jkt if isinstance(jkt, str) else None,
            scopes=_granted_scopes(claims),
            countersigners=countersigners,
        )

    def _lacking_scopes(self, claims: dict[str, Any]) -> list[str]:
        """Check 3 (and C2): the required scopes the ``scope`` claim lacks."""
        granted = _granted_scopes(claims)
        return [s for s in self.required_scopes if s not in granted]

    def _check_countersigners(
        self, pairs: list[tuple[str, str]], claims: dict[str, Any], entry: dict[str, Any]
    ) -> list[str]:
        """C1-C5 for the person's token's ``claims`` and binding ``entry``: the distinct
        countersigners besides the person, in header order; nothing when none are required."""
        if not self.required_countersigners:
            return []
        tokens = _countersign_tokens(pairs)
        if tokens is None:
            raise Refusal(
                "countersign_missing",
                "This API requires countersigned calls: send exactly one Countersign-Tokens"
                " header.",
            )
        if not tokens:
            raise Refusal("countersign_missing", "The Countersign-Tokens header holds no token.")
        # Each check on every token before the next check: the contract's order.
        all_claims = [self._countersign_claims(i, token) for i, token in enumerate(tokens)]
        for i, countersign in enumerate(all_claims):
            own = _call_entries(countersign)
            if len(own) != 1 or own[0] != entry:
                raise _countersign_invalid(
                    "binding", i, "its countersign_call entry is not the approved call's."
                )
        for i, countersign in enumerate(all_claims):
            # No DPoP proof of its own: bound to the person's key, which check 4 proved.
            if _bound_key(countersign) != _bound_key(claims):
                raise _countersign_invalid("key", i, "its cnf.jkt is not the approver's token's.")
        return _enough_countersigners(all_claims, claims["sub"], self.required_countersigners)

    def _countersign_claims(self, index: int, token: str) -> dict[str, Any]:
        """C2: the countersign token passes checks 2 and 3, as the person's token did."""
        try:
            claims = self._token_claims(token, jwt.get_unverified_header(token))
        except PyJWTError:
            raise _countersign_invalid("token", index, "it is not a JWT.") from None
        except _InvalidToken as exc:
            raise _countersign_invalid("token", index, str(exc)) from None
        missing = self._lacking_scopes(claims)
        if missing:
            raise _countersign_invalid(
                "token", index, f"the token lacks the scope(s): {' '.join(missing)}."
            )
        return claims

    def _check_token(self, creds: _Credentials, dpop: bool) -> dict[str, Any]:
        # 2. signature, iss, aud, exp, nbf
        try:
            return self._token_claims(creds.token, creds.header)
        except _InvalidToken as exc:
            raise Refusal("token_invalid", str(exc), dpop=dpop) from None

    def _token_claims(self, token: str, header: dict[str, Any]) -> dict[str, Any]:
        """Check 2 (and C2) for ``token`` with its unverified ``header``: its claims, or
        :class:`_InvalidToken` with the refusal's detail."""
        alg = header.get("alg")
        kid = header.get("kid")
        if alg not in ASYMMETRIC_ALGS or (kid is not None and not isinstance(kid, str)):
            raise _InvalidToken("The access token is not signed with an asymmetric algorithm.")
        try:
            candidates = self._keys.candidates(kid, alg)
        except _KeysUnavailable:
            # Contract (settled details): token_invalid, with a detail saying so.
            raise _InvalidToken(
                "The authorization server's signing keys could not be fetched to verify the"
                " access token."
            ) from None
        if not candidates:
            raise _InvalidToken(
                "The access token is not signed by a key of the authorization server."
            )
        last: PyJWTError | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key=key,
                    algorithms=[alg],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                    options={"require": ["exp", "iss", "aud"], "verify_iat": False},
                )
            except PyJWTError as exc:
                last = exc
                if not isinstance(exc, jwt.InvalidSignatureError):
                    break
                continue
            if not isinstance(claims.get("sub"), str):
                raise _InvalidToken("The access token has no subject (a string sub).")
            return claims
        raise _InvalidToken(_token_error_detail(last))

    def _check_dpop(
        self,
        creds: _Credentials,
        pairs: list[tuple[str, str]],
        jkt: Any,
        method: str,
        target: str | bytes,
        host: str | None,
        url: str | None,
    ) -> None:
        def invalid(detail: str, fld: str) -> Refusal:
            return Refusal("dpop_proof_invalid", detail, field=fld)

        if jkt is None and self.require_dpop:
            raise Refusal(
                "dpop_proof_missing", "This API requires DPoP-bound tokens; this one is not bound."
            )
        proofs = _values(pairs, "dpop")
        if creds.scheme != "dpop":
            raise Refusal(
                "dpop_proof_missing",
                "The access token is DPoP-bound: it must be sent as 'Authorization: DPoP'"
                " with a DPoP proof.",
            )
        if len(proofs) != 1:
            raise Refusal(
                "dpop_proof_missing",
                "The request has no DPoP proof." if not proofs
                else "The request has more than one DPoP header.",
            )
        proof = proofs[0].strip()
        try:
            header = jwt.get_unverified_header(proof)
        except PyJWTError:
            raise invalid("The DPoP proof is not a JWT.", "proof") from None
        if header.get("typ") != "dpop+jwt":
            raise invalid("The DPoP proof's typ is not dpop+jwt.", "proof")
        alg = header.get("alg")
        if alg not in ASYMMETRIC_ALGS:
            raise invalid("The DPoP proof is not signed with an asymmetric algorithm.", "proof")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or _PRIVATE_JWK_MEMBERS & jwk.keys():
            raise invalid("The DPoP proof has no public jwk in its header.", "proof")
        try:
            key = PyJWK(jwk, algorithm=alg)
            payload_bytes = jwt.PyJWS().decode(proof, key=key, algorithms=[alg])
            claims = json.loads(payload_bytes)
            thumbprint = jwk_thumbprint(jwk)
        except (PyJWTError, ValueError):
            raise invalid("The DPoP proof's signature does not verify with its jwk.", "proof") from None
        if not isinstance(claims, dict):
            raise invalid("The DPoP proof's payload is not a JSON object.", "proof")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise invalid("The DPoP proof has no jti.", "proof")

        if claims.get("htm") != method:
            raise invalid("The DPoP proof was made for another method.", "htm")

        raw_target = target.decode("latin-1") if isinstance(target, bytes) else target
        path = raw_target.split("?", 1)[0]
        if self.external_url is not None:
            expected_url = self.external_url + path
        elif url is not None:
            expected_url = url
        else:
            raise ServerError(
                "The verifier was given no request URL and has no external_url to check DPoP htu."
            )
        htu = claims.get("htu")
        expected = _normalise_url(expected_url)
        if expected is not None:
            expected = (*expected[:4], "", "")  # the request URL without query and fragment
        if expected is None:
            raise ServerError("The request URL given to the verifier is not an absolute URL.")
        if not isinstance(htu, str) or _normalise_url(htu) != expected:
            raise invalid("The DPoP proof was made for another URL.", "htu")

        iat = claims.get("iat")
        now = time.time()
        if (
            isinstance(iat, bool)
            or not isinstance(iat, int | float)
            or abs(now - iat) > self.dpop_window
        ):
            raise invalid("The DPoP proof's iat is outside the accepted window.", "iat")

        ath = claims.get("ath")
        if not isinstance(ath, str) or not hmac.compare_digest(
            ath.encode(), b64url_sha256(creds.token.encode("ascii")).encode()
        ):
            raise invalid("The DPoP proof's ath is not the hash of this access token.", "ath")

        if not isinstance(jkt, str) or not hmac.compare_digest(jkt.encode(), thumbprint.encode()):
            raise invalid("The DPoP proof is signed by another key than the token is bound to.", "key")

        if not self.dpop_jtis_seen.add(jti, max(float(iat), now) + self.dpop_window, now):
            raise Refusal("dpop_proof_replayed", "This DPoP proof was already used.")


def _granted_scopes(claims: dict[str, Any]) -> tuple[str, ...]:
    scope = claims.get("scope")
    return tuple(scope.split()) if isinstance(scope, str) else ()


def _call_entries(claims: dict[str, Any]) -> list[dict[str, Any]]:
    """Check 5 (and C3): the token's countersign_call entries; exactly one is a binding."""
    details = claims.get("authorization_details")
    if not isinstance(details, list):
        return []
    return [d for d in details if isinstance(d, dict) and d.get("type") == BINDING_TYPE]


def _bound_key(claims: dict[str, Any]) -> Any:
    """Check 4 (and C4): the ``cnf.jkt`` the token is bound to, if any."""
    cnf = claims.get("cnf")
    return cnf.get("jkt") if isinstance(cnf, dict) else None


def _countersign_tokens(pairs: list[tuple[str, str]]) -> list[str] | None:
    """C1: the tokens of the one ``Countersign-Tokens`` field, ``None`` unless there is exactly
    one. Empty list elements are ignored (RFC 9110 5.6.1)."""
    fields = _values(pairs, COUNTERSIGN_HEADER)
    if len(fields) != 1:
        return None
    return [t.strip() for t in fields[0].split(",") if t.strip()]


def _enough_countersigners(
    all_claims: list[dict[str, Any]], person: str, required: int
) -> list[str]:
    """C5: at least ``required`` distinct subs besides the person's, in header order."""
    others = list(dict.fromkeys(c["sub"] for c in all_claims if c["sub"] != person))
    if len(others) < required:
        noun, verb = ("countersigner", "is") if required == 1 else ("countersigners", "are")
        raise Refusal(
            "countersign_insufficient",
            f"{required} distinct {noun} besides {person} {verb} required;"
            f" the call carries {len(others)}.",
        )
    return others


def _countersign_invalid(field_name: str, index: int, why: str) -> Refusal:
    """A ``countersign_invalid`` on ``field_name``, naming the token by its position; ``why`` is
    a sentence of its own, continued after a colon."""
    continued = why[:1].lower() + why[1:]
    return Refusal(
        "countersign_invalid",
        f"The {_ordinal(index + 1)} countersign token: {continued}",
        field=field_name,
    )


def _ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``12th``, ``13th``, ``21st``, ..."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _token_error_detail(exc: PyJWTError | None) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "The access token has expired."
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "The access token is not valid yet (nbf)."
    if isinstance(exc, jwt.InvalidIssuerError):
        return "The access token was issued by another issuer."
    if isinstance(exc, jwt.InvalidAudienceError):
        return "The access token is for another audience."
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"The access token has no {exc.claim} claim."
    if isinstance(exc, jwt.InvalidSignatureError):
        return "The access token's signature does not verify."
    return "The access token is invalid."
