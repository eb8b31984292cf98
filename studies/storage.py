"""Opening Optuna storages from a URL, with every failure a one-line user error.

* ``sqlite:///FILE.db`` (the default is :data:`~autoprune.studies.DEFAULT_STORAGE`): one process;
* ``journal:///path/to/search.log`` (or any path ending in ``.log``/``.journal``): Optuna's
  journal file storage, for several worker processes on one host;
* ``postgresql://user:pass@host/db`` (or any SQLAlchemy URL): several hosts. Trials there send
  heartbeats, so a worker that dies mid-episode is noticed by the others.
"""

from __future__ import annotations

import sqlite3
import tempfile
import warnings
from pathlib import Path

import optuna

from autoprune.errors import AutopruneError
from autoprune.studies import DEFAULT_STORAGE

HEARTBEAT_INTERVAL = 20  # seconds between a running trial's heartbeats (RDB storages)
GRACE_PERIOD = 90  # a running trial silent this long is stale


def storage_kind(url: str) -> str:
    """``sqlite``, ``journal`` or ``rdb``."""
    if url.startswith("sqlite:"):
        return "sqlite"
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        return "journal"
    if "://" in url:
        return "rdb"
    raise AutopruneError(
        f"cannot read storage {url!r}; use sqlite:///FILE.db, journal:///FILE.log or a "
        "database URL such as postgresql://user:password@host/db"
    )


def journal_path(url: str) -> Path:
    return Path(url[len("journal://"):] if url.startswith("journal://") else url)


def sqlite_path(url: str) -> Path:
    rest = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite:"):]
    return Path(rest) if rest else Path(":memory:")


def _check_writable_dir(path: Path, what: str) -> None:
    """Refuse a location the process cannot write, by trying (permission bits lie to root)."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise AutopruneError(f"cannot create {what} {path}: folder {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
        if path.exists():
            with open(path, "r+b"):
                pass
    except OSError as err:
        where = path if path.exists() else parent
        raise AutopruneError(f"cannot write {what} {path}: {where} is read-only ({err.strerror}); "
                             "use a storage in a writable location") from None


def _check_sqlite(path: Path) -> None:
    _check_writable_dir(path, "database")
    if path.exists() and path.stat().st_size > 0:
        try:
            # read-write but never create: a kill -9 mid-transaction leaves a hot journal, which
            # SQLite rolls back on the first read-write open; a read-only one cannot and fails
            with sqlite3.connect(f"file:{path}?mode=rw", uri=True) as con:
                con.execute("PRAGMA schema_version").fetchone()
        except sqlite3.DatabaseError as err:
            raise AutopruneError(f"{path} is not a readable SQLite database ({err}); move it "
                                 "aside or pass another --storage") from None


def check_storage(url: str = DEFAULT_STORAGE) -> None:
    """Fail early, before any expensive work, if ``url`` cannot serve as storage.

    File storages are checked without being created (a search that fails later leaves no empty
    database behind); a database server is connected to.
    """
    kind = storage_kind(url)
    if kind == "sqlite":
        if str(sqlite_path(url)) != ":memory:":
            _check_sqlite(sqlite_path(url))
    elif kind == "journal":
        _check_writable_dir(journal_path(url), "journal")
    else:
        open_storage(url)


def open_storage(url: str = DEFAULT_STORAGE) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; unreachable or unusable storage is a user error."""
    kind = storage_kind(url)
    try:
        if kind == "journal":
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            path = journal_path(url)
            _check_writable_dir(path, "journal")
            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
            return optuna.storages.JournalStorage(backend)
        if kind == "sqlite":
            path = sqlite_path(url)
            if str(path) != ":memory:":
                _check_sqlite(path)
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                engine_kwargs={"pool_pre_ping": True},
            )
    except AutopruneError:
        raise
    except ImportError:
        raise AutopruneError(f"storage {_redact(url)} needs its database driver; for PostgreSQL: "
                             "pip install 'autoprune[postgres]' (psycopg)") from None
    except Exception as err:  # sqlalchemy OperationalError, ArgumentError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AutopruneError(f"cannot open storage {_redact(url)}: {first[:200]}") from None


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
