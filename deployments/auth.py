"""Optional API key: `Authorization: Bearer <key>` on every /v1 route when the service is given a key."""

from __future__ import annotations

import hmac

from deployments.http_errors import AuthenticationError


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Raises AuthenticationError unless no key is configured or the header carries it."""
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    # compare_digest: the time taken must not reveal how much of the key matched
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise AuthenticationError("missing or invalid API key (send `Authorization: Bearer <key>`)")
