"""Redis URLs made safe to print: the password (in the address or the query) replaced by ``***``.

A Redis URL carries its password (``redis://:PASSWORD@host:6379/0``, or ``rediss://`` for TLS,
or a ``?password=`` / ``?ssl_password=`` query value), so every log line and console message
that names a Redis shows :func:`redact_url` of it, never the URL itself.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"


def redact_url(url: str | None) -> str:
    """``url`` with any password masked; user, host, port, database and other options kept."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{REDACTED}@{host}" if has_password else f"{user}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(key, REDACTED if "pass" in key.lower() else value) for key, value in pairs],
                              safe="/*:")
        text = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        if not netloc and url.startswith(f"{parts.scheme}:///"):  # unix:///path keeps its slashes
            text = text.replace(f"{parts.scheme}:", f"{parts.scheme}://", 1)
        return text
    except ValueError:  # not even a URL: show nothing of it
        return f"<unparsable Redis URL {REDACTED}>"


# scheme://[user]:password@ -- the password part of any Redis URL inside a longer text
_URL_PASSWORD = re.compile(r"((?:rediss?|unix)://[^:@/\s]*:)[^@\s]+@")


def mask_urls(text: str) -> str:
    """``text`` with the password of every Redis URL in it masked (for log lines)."""
    return _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", text) if "://" in text else text
