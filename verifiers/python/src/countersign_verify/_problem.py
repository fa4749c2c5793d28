"""Refusals as RFC 9457 problem documents (docs/call-binding.md)."""

from __future__ import annotations

import json
from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"

# code -> (status, title)
CODES: dict[str, tuple[int, str]] = {
    "token_missing": (401, "Access token missing"),
    "token_invalid": (401, "Access token invalid"),
    "insufficient_scope": (403, "Insufficient scope"),
    "dpop_proof_missing": (401, "DPoP proof missing"),
    "dpop_proof_invalid": (401, "DPoP proof invalid"),
    "dpop_proof_replayed": (401, "DPoP proof replayed"),
    "binding_missing": (403, "Call binding missing"),
    "binding_mismatch": (403, "Call binding mismatch"),
    "approval_replayed": (403, "Approval replayed"),
    "countersign_missing": (403, "Countersignatures missing"),
    "countersign_invalid": (403, "Countersignature invalid"),
    "countersign_insufficient": (403, "Too few countersigners"),
    # Answered by the integrations, which buffer the body (contract, settled details).
    "body_too_large": (413, "Request body too large"),
}

_DPOP_CODES = {"dpop_proof_missing", "dpop_proof_invalid", "dpop_proof_replayed"}


class Refusal(Exception):
    """A refused call: ``status``, ``problem`` (the problem+json document) and ``headers``."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        dpop: bool = False,
        status: int | None = None,
        title: str | None = None,
        type_uri: str | None = None,
    ) -> None:
        known = CODES.get(code)
        self.code = code
        self.field = field
        self.detail = detail
        self.status = status if status is not None else (known[0] if known else 500)
        problem: dict[str, Any] = {
            "type": type_uri or f"urn:countersign:problem:{code}",
            "title": title or (known[1] if known else "Internal Server Error"),
            "status": self.status,
            "code": code,
            "detail": detail,
        }
        if field is not None:
            problem["field"] = field
        self.problem = problem
        headers: dict[str, str] = {"Content-Type": PROBLEM_CONTENT_TYPE}
        if self.status == 401:
            if code in _DPOP_CODES:
                headers["WWW-Authenticate"] = 'DPoP error="invalid_dpop_proof"'
            elif dpop:
                headers["WWW-Authenticate"] = 'DPoP error="invalid_token"'
            else:
                headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        self.headers = headers
        super().__init__(f"{code}: {detail}")

    def body(self) -> bytes:
        """The problem document, serialised."""
        return json.dumps(self.problem, separators=(",", ":")).encode()

    def __repr__(self) -> str:
        return f"Refusal(code={self.code!r}, field={self.field!r}, status={self.status})"


class ServerError(Refusal):
    """The verifier cannot check the call at all (misconfiguration): a 500, never an acceptance."""

    def __init__(self, detail: str) -> None:
        super().__init__("internal_error", detail, status=500)
        # No Countersign code for the API's own misconfiguration: a plain RFC 9457 problem.
        self.problem = {
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "detail": detail,
        }
