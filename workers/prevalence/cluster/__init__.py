"""The multi-master layer: the master and its parts (recovery, writing, syncing,
housekeeping, reporting), shared folder, leases, progress, reader, membership, verify,
backup.

Built on the engine modules beside it (journal, snapshot, clock, codec, model), which
know nothing of this layer.
"""

from .follower import Follower
from .master import Master
from .membership import read_retired, retire
from .progress import read_all_progress
from .verify import verify

__all__ = ["Master", "Follower", "retire", "read_retired", "read_all_progress", "verify"]
