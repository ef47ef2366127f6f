"""Errors of the prevalence engine: one root, a shallow tree below it.

Operating errors (a torn journal, a held lease, a damaged snapshot) are expected and
raised as one of these classes. Programmer errors (a seq going backwards, use after
close) raise `InvariantViolation`, which is never caught inside the engine.
"""

from __future__ import annotations


class PrevalenceError(Exception):
    """Root of every error the engine raises on purpose."""


class Rejected(PrevalenceError):
    """Raised by a transaction to refuse cleanly, before it mutates anything.

    The refusal is a recorded outcome like any other: every master that replays the
    record refuses it the same way.
    """


class RequestError(PrevalenceError):
    """Raised when a request is refused before anything is written."""


class UnknownTransaction(RequestError):
    """Raised when a transaction or query name is not declared by the model."""


class UnknownQuery(UnknownTransaction):
    """Raised when a query name is not declared by the model (a subclass of
    `UnknownTransaction`, which callers of older releases catch)."""


class BadArguments(RequestError):
    """Raised when arguments do not fit the transaction's signature or cannot be encoded."""


class TransactionFailed(PrevalenceError):
    """Raised by `execute` when the transaction raised something other than `Rejected`.

    The record stays in the journal: replay raises the same way on every master.
    """

    def __init__(self, tx: str, error_type: str, message: str):
        super().__init__(f"transaction {tx!r} raised {error_type}: {message}")
        self.tx = tx
        self.error_type = error_type
        self.message = message


class NotReady(PrevalenceError):
    """Raised when a master cannot take writes yet (it is still joining the cluster)."""


class ClockSkew(NotReady):
    """Raised when a master is asked to write while its wall clock disagrees with the
    shared folder's clock (the file server's) by more than the allowed drift: a record it
    stamped would hold its peers back (clock behind: it could not read theirs; ahead: they
    could not read its). It takes no writes until the host's clock is corrected; its syncs
    go on, timed by the folder's clock, so it holds nobody back.
    """


class StorageError(PrevalenceError):
    """Raised when the disk refuses an operation (fsync/close/rename failed, ENOSPC, EIO)."""


class Corruption(PrevalenceError):
    """Raised when a journal record or snapshot is damaged and cannot be trusted.

    Carries where (path, offset, master, seq) and what was expected and found. The
    engine never skips such a record and never truncates good data because of it.
    """

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None,
                 master: str | None = None, seq: int | None = None, gap: bool = False):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if offset is not None:
            where.append(f"offset {offset}")
        if master is not None:
            where.append(f"master {master}")
        if seq is not None:
            where.append(f"seq {seq}")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(prefix + message)
        self.path = path
        self.offset = offset
        self.master = master
        self.seq = seq
        self.gap = gap  # records are missing (collected), as opposed to damaged


class TruncatedSegment(Corruption):
    """Raised when a sealed journal segment is shorter than its seal says: records that were
    durable are gone (the file was cut or replaced). The records before the cut were read.
    """


class BadFile(Corruption):
    """Raised when a file of the shared folder is not what it must be: a small file (lease,
    progress, seal, founder, retirement) that does not parse into its typed form, is
    unsigned or badly signed while a cluster key is configured, or says it is about
    another master or another kind of file; a snapshot about another master.

    The one error of every small file: its message names the file, what was expected and
    what was found.
    """


class UnsafeFile(BadFile):
    """Raised when a path of the shared folder is not a regular file the engine may use: a
    symbolic link, FIFO, device or directory where a file should be (or a symbolic link
    where a directory should be), or a file larger than its kind may be.

    Nothing is followed, read or blocked on (invariant 9).
    """


class UnknownRecordTransaction(Corruption):
    """Raised when a journal holds a transaction this code does not know (version skew).

    Replay of that master's journal stops at the record and resumes by itself once the
    code declares the transaction.
    """


class LeaseHeld(PrevalenceError):
    """Raised when another live process already holds the master name."""


class LeaseLost(NotReady):
    """Raised when this process may no longer hold its master name: the lease file names
    another process (a new owner took the name over while this one was paused), it
    vanished with the master's folder, or this process's own lease expired by its
    monotonic clock and could not be confirmed. Nothing more is written or acknowledged;
    restart the master to recover.
    """


class RetiredMaster(PrevalenceError):
    """Raised when a master name was retired from the cluster and tries to start again."""


class LostRecords(PrevalenceError):
    """Raised when records of this master that were published are no longer in its journal:
    its own progress file, a seal, a snapshot or a peer's cursor says they were written.

    This happens after a machine crash under `fsync=never`/`interval`, or when a journal
    file was damaged or cut: restarting would write different records under the same
    seqs, so the master refuses to start. The message names the missing range.
    """


class UnsupportedState(PrevalenceError):
    """Raised when the state does not read back equal from the codec, so it cannot be
    snapshotted faithfully (e.g. Structs inside a loosely typed container)."""


class InvariantViolation(PrevalenceError):
    """Raised when an engine invariant is broken: a bug, never an operating condition."""


def check(condition: bool, message: str) -> None:
    """Always-on invariant check (unlike `assert`, it survives `python -O`)."""
    if not condition:
        raise InvariantViolation(message)
