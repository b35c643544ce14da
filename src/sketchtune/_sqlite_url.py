"""SQLite storage URLs whose file path the URL parser would change are refused, with the fix."""

from __future__ import annotations

import re

__all__ = ["check_sqlite_path", "url_decodes_paths"]

_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def check_sqlite_path(url: str) -> None:
    """Raise ``ValueError`` if ``url`` (a SQLite URL) would open another file than its path says.

    ``sqlite:////runs/a?b/x.db`` opens ``/runs/a`` (``?`` starts the URL's options) and,
    with SQLAlchemy 2.1 or later, ``sqlite:////runs/a%20b/x.db`` opens ``/runs/a b/x.db``
    (escapes are decoded): there a literal ``?`` is written ``%3F`` and a literal ``%``
    ``%25``, any other character as itself. SQLAlchemy 2.0 keeps escapes as written, so
    any escape is refused (the URL would name another file on a newer SQLAlchemy). Options (``?timeout=30``) and SQLite URIs (``sqlite:///file:x.db?mode=ro&uri=true``)
    are left alone. Other URLs are not checked.
    """
    if not url.startswith("sqlite") or "://" not in url:
        return
    path, qmark, query = url.partition("://")[2].partition("?")
    options = [part for part in re.split(r"[&;]", query) if part]
    if qmark and (not options or any("=" not in o or "/" in o for o in options)):
        raise ValueError(
            f"the storage URL {url!r} has a '?', which starts a URL's options, so SQLite would "
            f"open {_opened(url)!r}. If the '?' is part of the file's path, write it as %3F "
            "(and a literal '%' as %25)."
        )
    if path[1:].startswith("file:"):
        return  # an SQLite URI decodes its own escapes
    escapes = sorted({e.upper() for e in _ESCAPE.findall(path)})
    if not escapes:
        return
    if not url_decodes_paths():
        # SQLAlchemy before 2.1 keeps escapes as written, newer ones decode them: the same
        # URL would name two files, and a literal '?' cannot be written at all
        raise ValueError(
            f"the storage URL {url!r} has {', '.join(escapes)} in its path, which SQLAlchemy "
            f"{_sqlalchemy_version()} keeps as written (SQLite would open {_opened(url)!r}) "
            "and SQLAlchemy 2.1 and later decode. Write the path's characters as themselves "
            "(a space or a '%' may stay as it is); a path with a '?' needs SQLAlchemy >= 2.1, "
            "where it is written %3F."
        )
    unneeded = [e for e in escapes if e not in ("%25", "%3F")]
    if unneeded:
        raise ValueError(
            f"the storage URL {url!r} has {', '.join(unneeded)} in its path, which the URL "
            f"parser decodes, so SQLite would open {_opened(url)!r}. Write those characters as "
            "themselves (a space may stay a space); only a literal '%' (%25) and '?' (%3F) "
            "are escaped."
        )


def url_decodes_paths() -> bool:
    """Whether the installed SQLAlchemy decodes ``%xx`` escapes in a URL's path (2.1 and later)."""
    from sqlalchemy.engine import make_url

    return make_url("sqlite:///%41").database == "A"


def _sqlalchemy_version() -> str:
    import sqlalchemy

    return str(sqlalchemy.__version__)


def _opened(url: str) -> str:
    """The file SQLAlchemy opens for ``url``."""
    from sqlalchemy.engine import make_url

    return str(make_url(url).database)
