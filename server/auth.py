"""API keys: ``Authorization: Bearer <key>`` on every ``/v1/`` path when keys are configured.

Checked by the edge middleware (server/app.py) from the headers alone, before anything reads the body: a
client without a valid key cannot make the server read, buffer or parse a byte of what it sends. The
routes' ``Authorized`` dependency runs the same check (for apps mounted without the middleware).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from dcar.server.errors import ApiError

PROTECTED_PREFIX = "/v1/"


def check_api_key(authorization: str, keys: Sequence[str]) -> None:
    """Raise 401 unless ``authorization`` carries one of ``keys`` (compared in constant time); no keys: open."""
    if not keys:
        return
    scheme, _, token = authorization.partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "missing_api_key",
            "Authorization: Bearer <key> is required",
            "Authorization",
            headers=challenge,
            reason="unauthorized",
        )
    given = token.strip().encode()
    matched = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        matched |= hmac.compare_digest(given, key.encode())
    if not matched:
        raise ApiError(
            401,
            "invalid_api_key",
            "the API key is not valid",
            "Authorization",
            headers=challenge,
            reason="unauthorized",
        )


def refusal(path: str, headers: Mapping[bytes, bytes], keys: Sequence[str]) -> ApiError | None:
    """The 401 for a request to ``path`` with these raw headers, or None when it may proceed."""
    if not keys or not path.startswith(PROTECTED_PREFIX):
        return None
    try:
        check_api_key(headers.get(b"authorization", b"").decode("latin-1"), keys)
    except ApiError as e:
        return e
    return None
