"""The session-affinity key a device presents so a load balancer keeps it on one replica.

Why: a session's state (the target's KV cache of everything committed) lives in one edge
process. A balancer in front of several replicas must send every connection of a device
to the replica that holds its cache, and move only the sessions of a replica that dies or
drains. Proven balancers (HAProxy `balance url_param`/`hdr` with `hash-type consistent`,
nginx `hash $arg_dssd_key consistent`) do that when the connection carries a stable key;
this module is the one definition of its name on the URL and in the upgrade request.

The key is opaque to the edge (never trusted, never needed for exactness: a device that
lands on another replica resumes exactly from what it committed). It only needs to be
stable across a device's reconnections and different between devices.
"""
from __future__ import annotations

import re
import secrets
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Query parameter of the WebSocket URL the balancer hashes on (`?dssd_key=...`).
KEY_PARAM = "dssd_key"
#: The same key as an HTTP header of the upgrade request, for balancers that hash headers.
KEY_HEADER = "X-DSSD-Key"
#: A key is 1-64 URL-safe characters, so it travels unescaped in a URL and a header.
_KEY_RE = re.compile(r"[A-Za-z0-9._~-]{1,64}")


def new_key() -> str:
    """A random key (128 bits): one per device runtime, kept across its reconnections."""
    return secrets.token_hex(16)


def check_key(key: str) -> str:
    """`key` if it is a valid affinity key, else ValueError naming the rule."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"session key {key!r} must be 1-64 characters of A-Z a-z 0-9 . _ ~ -")
    return key


def with_key(url: str, key: str) -> str:
    """`url` with `?dssd_key=KEY` set (any other query parameters kept, an old key replaced)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != KEY_PARAM]
    query.append((KEY_PARAM, check_key(key)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def key_of(path: str, headers: "object | None" = None) -> str:
    """The key of an upgrade request (its query parameter, else its header), or ""; for logs."""
    query = urlsplit(path).query
    for k, v in parse_qsl(query):
        if k == KEY_PARAM and _KEY_RE.fullmatch(v):
            return v
    value = headers.get(KEY_HEADER, "") if headers is not None else ""  # type: ignore[attr-defined]
    return value if isinstance(value, str) and _KEY_RE.fullmatch(value) else ""
