"""The test process's side of the guest drivers: a hub that accepts their connections, and a
handle per guest to send requests with deadlines (see `tests.nfs.guest_driver` for the
protocol).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class DriverError(Exception):
    """Raised when a driver answered a request with an error (type and message from the guest)."""

    def __init__(self, op: str, guest: str, error: dict):
        self.type = error.get("type")
        self.message = error.get("message")
        super().__init__(f"{op} on {guest}: {self.type}: {self.message}\n{error.get('trace', '')}")


class DriverGone(Exception):
    """Raised when a driver's connection closed during a request (it was killed, or died)."""


class DriverTimeout(Exception):
    """Raised when a driver did not answer within the request's deadline."""


class Connection:
    def __init__(self, sock: socket.socket, hello: dict, rfile):
        self.sock = sock
        self.hello = hello
        self.rfile = rfile
        self.next_id = 0
        self.broken = False

    def close(self) -> None:
        """Close; a thread blocked reading this connection gets end-of-file at once."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class Hub:
    """Accepts driver connections on the lab's listening socket; the newest per guest wins."""

    def __init__(self, listener: socket.socket):
        self.listener = listener
        self.conns: dict[str, Connection] = {}
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._accept_loop, name="nfs-hub", daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.5)
        while not self._stop:
            try:
                sock, _addr = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._greet, args=(sock,), daemon=True).start()

    def _greet(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        rfile = sock.makefile("rb")
        try:
            hello = json.loads(rfile.readline() or b"null")
        except (OSError, ValueError):
            hello = None
        if not isinstance(hello, dict) or "hello" not in hello:
            sock.close()
            return
        with self.cond:
            old = self.conns.get(hello["hello"])
            if old is not None:
                old.close()
            self.conns[hello["hello"]] = Connection(sock, hello, rfile)
            self.cond.notify_all()

    def wait_for(self, guest: str, *, newer_than: int = -1, deadline_s: float = 60.0,
                 boot_not: str | None = None) -> Connection:
        """The connection of `guest`'s driver whose incarnation is above `newer_than` (and,
        with `boot_not`, from another boot of the guest than that one)."""
        end = time.monotonic() + deadline_s
        with self.cond:
            while True:
                c = self.conns.get(guest)
                if (c is not None and c.hello["incarnation"] > newer_than and not c.broken
                        and (boot_not is None or c.hello.get("boot_id") != boot_not)):
                    return c
                left = end - time.monotonic()
                if left <= 0:
                    raise DriverTimeout(f"no driver of guest {guest} (incarnation > {newer_than}) "
                                        f"connected within {deadline_s:.0f} s")
                self.cond.wait(min(left, 0.5))

    def stop(self) -> None:
        self._stop = True
        with self.cond:
            for c in self.conns.values():
                c.close()
            self.conns.clear()


class RemoteGuest:
    """Requests to the driver of one guest. Methods mirror the driver's ops."""

    def __init__(self, hub: Hub, guest, log_tail: Callable[[], str] = lambda: ""):
        self.hub = hub
        self.name = guest.name if hasattr(guest, "name") else guest
        self.guest = guest
        self.log_tail = log_tail
        self.incarnation = -1
        self.boot_id: str | None = None

    def connection(self, deadline_s: float = 60.0) -> Connection:
        c = self.hub.wait_for(self.name, newer_than=self.incarnation - 1, deadline_s=deadline_s)
        self.incarnation = c.hello["incarnation"]
        self.boot_id = c.hello.get("boot_id")
        return c

    def request(self, op: str, *, deadline_s: float = 60.0, on_event: Callable[[dict], None] | None = None,
                **args) -> Any:
        """Send one request and wait for its answer, at most `deadline_s` in all.

        Raises DriverError (the driver reported an error), DriverGone (the connection closed:
        the driver was killed), DriverTimeout (no answer in time).
        """
        c = self.connection(deadline_s)
        c.next_id += 1
        rid = c.next_id
        end = time.monotonic() + deadline_s
        try:
            c.sock.settimeout(max(0.1, end - time.monotonic()))
            c.sock.sendall(json.dumps({"id": rid, "op": op, "args": args}).encode() + b"\n")
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                c.sock.settimeout(left)
                line = c.rfile.readline()
                if not line:
                    c.broken = True
                    raise DriverGone(f"driver of {self.name} closed the connection during {op}\n{self.log_tail()}")
                msg = json.loads(line)
                if msg.get("id") != rid:
                    continue
                if "event" in msg:
                    if on_event is not None:
                        on_event(msg["event"])
                    continue
                if "error" in msg:
                    raise DriverError(op, self.name, msg["error"])
                return msg["result"]
        except socket.timeout:
            c.broken = True
            c.close()
            raise DriverTimeout(f"{op} on {self.name}: no answer within {deadline_s:.0f} s\n{self.log_tail()}") from None
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, (DriverGone, DriverTimeout)):
                raise
            c.broken = True
            raise DriverGone(f"driver of {self.name}: {exc} during {op}") from None

    def restart_driver(self, *, deadline_s: float = 60.0) -> None:
        """Ask the driver to close its masters and exit; wait for the fresh one."""
        old = self.incarnation
        try:
            self.request("reset", deadline_s=min(deadline_s, 30.0))
        except (DriverGone, DriverTimeout):
            pass
        self.incarnation = old + 1
        self.connection(deadline_s)

    def drop_connection(self) -> None:
        """Forget the driver's connection (its guest was powered off: the guest kernel will
        never close it); a request waiting on it fails with DriverGone at once."""
        with self.hub.cond:
            c = self.hub.conns.pop(self.name, None)
        if c is not None:
            c.broken = True
            c.close()

    def rebooted(self, guest, *, deadline_s: float = 90.0) -> None:
        """After the lab power-cycled this guest: wait for the first driver of its new boot."""
        old_boot = self.boot_id
        self.guest = guest
        self.log_tail = guest.log_tail
        c = self.hub.wait_for(self.name, newer_than=-1, deadline_s=deadline_s, boot_not=old_boot)
        self.incarnation = c.hello["incarnation"]
        self.boot_id = c.hello.get("boot_id")

    def wait_restarted(self, *, deadline_s: float = 60.0) -> int:
        """After a kill: wait for the guest's next driver; returns its incarnation."""
        self.incarnation += 1
        self.connection(deadline_s)
        return self.incarnation


def in_parallel(calls: list[Callable[[], Any]], deadline_s: float = 120.0) -> list[Any]:
    """Run callables at once (each one talks to its own guest); re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result(timeout=deadline_s) for f in futures]
