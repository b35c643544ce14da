"""Storage URLs without their secrets, for every place a URL can be shown or stored."""

from __future__ import annotations

import re

__all__ = ["redact"]

_SECRET_QUERY = re.compile(
    r"(?P<key>(?:^|[?&;])(?:password|passwd|pwd|pass|secret|token|sslpassword)=)[^&;#]*",
    re.IGNORECASE,
)


def redact(storage: object) -> object:
    """``storage`` as it may be shown: URLs with passwords replaced by ``***``.

    Covers ``user:password@host`` (also when the password itself holds ``@``,
    ``:`` or ``/``), and ``password=``-style query parameters; a storage
    object is shown by its type name.

    Example:
        >>> redact("postgresql+psycopg://me:p@ss:w/rd@db.internal:5432/tune?password=x&sslmode=require")
        'postgresql+psycopg://me:***@db.internal:5432/tune?password=***&sslmode=require'
    """
    if storage is None:
        return None
    if not isinstance(storage, str):
        return type(storage).__name__
    head, sep, rest = storage.partition("://")
    if not sep:
        return _SECRET_QUERY.sub(r"\g<key>***", storage)
    before_query, qmark, query = rest.partition("?")
    at = before_query.rfind("@")  # a host never holds "@": the last one ends the credentials
    if at >= 0:
        user, colon, _ = before_query[:at].partition(":")
        credentials = f"{user}:***" if colon else user
        before_query = f"{credentials}@{before_query[at + 1 :]}"
    if qmark:
        query = _SECRET_QUERY.sub(r"\g<key>***", "?" + query)[1:]
    return f"{head}{sep}{before_query}{qmark}{query}"
