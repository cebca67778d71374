"""Whose fault is a failed batch: the database's (retry it) or one message's (park that one).

A batch that fails is never skipped. What decides the next step is what the error *is*, not a
guess from its text:

- the database itself failed: its connection, its resources, a conflict with another writer,
  its schema (SQLSTATE classes 08 connection, 0A a cached plan whose result type changed,
  25 transaction state (a read-only standby after a failover), 26 a prepared statement a
  pooler lost, 28 authorisation, 3D catalog, 40 transaction rollback, 42 syntax or access
  rule, 53 insufficient resources, 55 object state (locks), 57 operator intervention, 58 system
  error, XX internal; and 23514 without a constraint name: no partition for the row, i.e. a
  ``seen_events`` day partition dropped under the worker; SQLite's busy, locked, full, I/O,
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

_DATABASE_CLASSES = frozenset(
    {"08", "0A", "25", "26", "28", "3D", "40", "42", "53", "55", "57", "58", "XX"}
)
# Classes where one message's values are plausibly at fault (data exception, integrity, a
# program limit such as a key too long for an index): never the bisection's circuit breaker.
MESSAGE_CLASSES = frozenset({"22", "23", "54"})
_NO_PARTITION = "23514"
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
    return str(sqlstate)[:2] in _DATABASE_CLASSES or is_missing_partition(orig)


def is_missing_partition(orig: BaseException | None) -> bool:
    """True for PostgreSQL's "no partition of relation ... found for row": 23514 like a CHECK
    violation, but without a constraint name. The partition was dropped (a restore, by hand)
    while this process believed it existed; recreating it is the cure, not a dead letter."""
    if getattr(orig, "sqlstate", None) != _NO_PARTITION:
        return False
    diag = getattr(orig, "diag", None)
    return diag is not None and getattr(diag, "constraint_name", None) is None


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE of a database error (None for anything else, SQLite included)."""
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else None
    sqlstate = getattr(orig, "sqlstate", None)
    return str(sqlstate) if sqlstate else None


def _psycopg_without_answer(orig: BaseException) -> bool:
    return isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError)
