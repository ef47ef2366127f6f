"""Several hosts sharing one folder through faultfs: each master name gets a mount of its
own (a host), as each master of a deployment runs on a host with its own NFS client."""

from __future__ import annotations

from pathlib import Path

from .mount import FaultMount

#: The faults every host has in the ``faultfs`` variant of the sync and recovery tests:
#: everything an NFS client does (write-behind, held descriptors and stat lagging, sticky
#: negative lookups, ESTALE on replaced files) plus short reads of at most 4093 bytes (a
#: frame is cut anywhere; a 256 KiB reserved tail still reads in a few hundred calls).
NFS_LIKE = {"short_reads": 4093}


class Hosts:
    def __init__(self, root: Path, mounts_dir: Path, hosts_max: int = 3, faults: dict | None = None):
        self.root = Path(root)
        self.mounts_dir = Path(mounts_dir)
        self.hosts_max = hosts_max
        self.faults = NFS_LIKE if faults is None else faults
        self.mounts: list[FaultMount] = []
        self.host_of: dict[str, int] = {}
        self.opened: list = []

    def mount_for(self, name: str) -> FaultMount:
        """The mount of `name`'s host: a new host for each new name, round robin past
        `hosts_max` (a master reopened under its name comes back on its host)."""
        if name not in self.host_of:
            self.host_of[name] = len(self.host_of) % self.hosts_max
        i = self.host_of[name]
        while len(self.mounts) <= i:
            k = len(self.mounts)
            self.mounts.append(FaultMount(self.root, self.mounts_dir / f"host{k}", self.faults).start())
        return self.mounts[i]

    def open(self, name: str, opener):
        master = opener(str(self.mount_for(name).path))
        self.opened.append(master)
        return master

    def stats(self) -> dict:
        total: dict[str, int] = {}
        for m in self.mounts:
            for k, v in m.stats().items():
                total[k] = total.get(k, 0) + v
        return total

    def stop(self) -> None:
        """Close every master opened here (their lease threads write to the mounts), then
        unmount every host."""
        for master in self.opened:
            try:
                master.close()
            except Exception:  # noqa: BLE001 -- teardown: a test may have closed it, or broken it on purpose
                pass
        for m in self.mounts:
            m.stop()
