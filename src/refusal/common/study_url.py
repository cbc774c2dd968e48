"""A study storage given as ``--storage``: a journal file path (one process) or a database URL (shared by
workers), checked before any work: the URL SQLAlchemy knows, its driver installed, the database opens."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

from ..errors import RefusalError


def is_shared(storage: str) -> bool:
    """True for a database URL (shared by workers), False for a journal file path (one process)."""
    return "://" in storage


def check_url(storage: str) -> None:
    """Validate ``--storage`` before anything is written: a URL of a database SQLAlchemy knows, its driver installed,
    an SQLite file (not ``:memory:``, which no other worker sees) in an existing folder."""
    if not is_shared(storage):
        raise RefusalError(f"--storage {storage} is not a database URL; give one such as sqlite:///study.db or postgresql://host/db")
    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    except ImportError:
        raise RefusalError("the search needs optuna; install it with: pip install 'refusal[search]'") from None
    try:
        url = make_url(storage)
        url.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise RefusalError(f"--storage {storage} is not a database URL SQLAlchemy knows; give one such as sqlite:///study.db") from None
    except ImportError as e:
        driver = e.name or f"for {url.drivername}"
        raise RefusalError(f"--storage {storage} needs the database driver {driver}; install it, or use sqlite:///study.db") from None
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:") or "memory" in str(url.query.get("mode", "")):
            raise RefusalError(f"--storage {storage} is an in-memory database, which no other worker sees; give a file such as sqlite:///study.db")
        folder = Path(url.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise RefusalError(f"--storage {storage}: the folder {folder} does not exist; create it or choose another path")


def check_database(storage: str) -> None:
    """Open ``--storage`` read-only before any work: an existing SQLite file must be a database, any other server reachable."""
    import sqlite3

    check_url(storage)  # first: without optuna (the search extra) this is the one-line "install refusal[search]"
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    try:
        if url.get_backend_name() == "sqlite":
            file = Path(url.database or "").expanduser().resolve()
            if file.is_file():
                with closing(sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True)) as db:
                    db.execute("SELECT count(*) FROM sqlite_master").fetchall()
        else:
            create_engine(url).connect().close()
    except Exception as e:  # sqlite3 and SQLAlchemy raise many types for a corrupt file or an unreachable server
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RefusalError(f"cannot open the study storage {storage} ({first}); repair or remove it, or give another URL") from None
