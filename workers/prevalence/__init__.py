"""The prevalence engine: the application's whole state in memory, every change journaled.

Glossary (one meaning per word, everywhere: code, logs, README, status output)

record
    One transaction (or tick) as written: master, seq, hlc, request id, name, arguments.
journal
    A master's append-only sequence of records, split in segments.
segment
    One journal file, ``journal/<first-seq>.log``; a new one starts past a size limit, and
    at every open of the master (a process never appends to a file it did not create).
seal
    Where a finished segment ends (its length and CRC-32), in ``journal/<first-seq>.seal``:
    nothing past it is read.
snapshot
    The committed state at a frontier, in one self-checking file.
seq
    A record's position in its master's journal: 1, 2, 3 ... without gaps.
hlc
    Hybrid logical clock reading stamped on every record: physical ms << 16 | counter.
tick
    A record with no change (empty transaction name): it only publishes a clock reading.
horizon
    For a peer P: the hlc of the last record this master has read from P. P will never
    write below it.
frontier
    The minimum horizon over all counted members (this master's own clock included).
committed
    A record at or below the frontier: known everywhere it will ever be needed; its
    outcome is final.
tentative
    A record above the frontier: applied, but its outcome may still change.
rebase
    Undoing the tentative records back to where a newly read record belongs and applying
    them again with it, in key order (the state is change-tracked: `tracked`).
master
    One process holding a full copy of the state and its own journal.
member
    A master counted in the frontier (joined and not retired).
lease
    The file that says which process holds a master name (one process per name).

Layers: `codec`, `journal` (format and reading), `seal`, `writer`, `durable`, `files`
(opening files of the share safely), `smallfile` (the form of small files), `snapshot`,
`clock`, `tracked` (change-tracked state), `model`, `replica` (state + tentative window),
`errors` are the engine and import nothing of sync or Celery; `cluster` (shared folder,
sync, membership, verify) builds on them. Public names are re-exported here.
"""

from .errors import PrevalenceError, Rejected
from . import errors
from .model import Context, Model
from .tracked import Struct
from .cluster import Follower, Master, read_all_progress, retire, verify

__all__ = ["Model", "Context", "Rejected", "Struct", "Master", "Follower", "verify", "retire", "read_all_progress",
           "errors", "PrevalenceError"]
