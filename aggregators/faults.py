"""Whose fault is a failed batch: the database's (retry it) or one message's (park that one).

A batch that fails is never skipped. What decides the next step is what the error *is*, not a
guess from its text:

- the database itself failed: its connection, its resources, a conflict with another writer,
  its schema (SQLSTATE classes 08 connection, 28 authorisation, 3D catalog, 40 transaction
  rollback, 42 syntax or access rule, 53 insufficient resources, 55 object state (locks),
  57 operator intervention, 58 system error, XX internal; SQLite's busy, locked, full, I/O,
  read-only, corrupt, no memory, and its generic SQLITE_ERROR for a missing table). The batch
  is retried with backoff, and while it fails nothing is acknowledged: the worker stalls, the
  lag metric rises, nothing is lost.
- anything else (a value the database refuses, class 22 or 23, a key too long for an index,
  class 54, or any Python error while applying) belongs to a message: the batch is split until
  the message at fault is found, that message is dead-lettered and the rest applied.
"""

from __future__ import annotations

import sqlite3

import psycopg
from sqlalchemy import exc as sa_exc

_DATABASE_CLASSES = frozenset({"08", "28", "3D", "40", "42", "53", "55", "57", "58", "XX"})
_SQLITE_DATABASE_CODES = frozenset(
    {
        "SQLITE_ERROR",  # no such table or column: the schema, not a message
        "SQLITE_BUSY",
        "SQLITE_LOCKED",
        "SQLITE_FULL",
        "SQLITE_IOERR",
        "SQLITE_CANTOPEN",
        "SQLITE_NOMEM",
        "SQLITE_PROTOCOL",
        "SQLITE_INTERRUPT",
        "SQLITE_READONLY",
        "SQLITE_CORRUPT",
        "SQLITE_NOTADB",
        "SQLITE_PERM",
        "SQLITE_AUTH",
    }
)


def is_database_failure(error: BaseException) -> bool:
    """True when ``error`` is the database's (or the machine's) own failure, not a message's."""
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        return _driver_error_is_database_failure(error.orig)
    if isinstance(error, sa_exc.SQLAlchemyError):
        # Pool timeouts, disconnections, a closed connection: never one message's doing.
        return isinstance(
            error, sa_exc.TimeoutError | sa_exc.DisconnectionError | sa_exc.ResourceClosedError
        )
    return isinstance(error, OSError | MemoryError)


def _driver_error_is_database_failure(orig: BaseException | None) -> bool:
    if isinstance(orig, sqlite3.Error):
        name = getattr(orig, "sqlite_errorname", "")
        # Extended codes (SQLITE_IOERR_WRITE, SQLITE_BUSY_SNAPSHOT) share their base code.
        return any(name == code or name.startswith(code + "_") for code in _SQLITE_DATABASE_CODES)
    sqlstate = getattr(orig, "sqlstate", None)
    if not sqlstate:
        # psycopg gives no SQLSTATE when there is no server answer: a lost or refused connection.
        return orig is None or _psycopg_without_answer(orig)
    return str(sqlstate)[:2] in _DATABASE_CLASSES


def _psycopg_without_answer(orig: BaseException) -> bool:
    return isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError)
