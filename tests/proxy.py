"""A loopback TCP proxy in front of a server, which a test can cut, freeze, slow down or make
hang: the network faults a process sees without the server itself failing.

One thread runs everything (a selector over the listening socket and every connection), so
a fault or ``heal()`` applies between two chunks, never in the middle of one, and ``close()``
leaves no thread or socket behind.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One client connection and its connection to the server (None when never connected through)."""

    client: socket.socket
    server: socket.socket | None
    up: deque[tuple[float, bytes]] = field(default_factory=deque)  # to the server: (due time, data)
    down: deque[tuple[float, bytes]] = field(default_factory=deque)  # to the client
    dead: bool = False  # cut: everything is dropped; closed at heal
    hung: bool = False  # a reply was swallowed: nothing more reaches the client; closed at heal
    ended: bool = False  # a side closed: the link closes once what is held is delivered

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.server) if s is not None]


class Proxy:
    """Forward connections on a free 127.0.0.1 port to ``127.0.0.1:target_port``, with faults on demand."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._waker, self._wake_end = socket.socketpair()
        self._waker.setblocking(False)
        self._wake_end.setblocking(False)
        self._links: set[_Link] = set()
        self._controls: deque[tuple[Callable[[], None], threading.Event]] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cut = self._frozen = False
        self._delay = 0.0
        self._hang_every = 0
        self._replies = 0  # server chunks seen while hang_one_in is on

    # -- life cycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._listener is not None, "Proxy.start() first"
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Listen on a free loopback port and start forwarding."""
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_end, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and close every socket (the listener and all connections)."""
        if self._thread is not None:
            self._stopping = True
            self._wake()
            self._thread.join(10)
            self._thread = None
        for link in list(self._links):
            self._drop(link)
        if self._listener is not None:
            self._listener.close()
        self._selector.close()
        self._waker.close()
        self._wake_end.close()

    # -- faults ----------------------------------------------------------------------------

    def cut(self) -> None:
        """A partition: nothing passes either way, connections stay open, new ones go nowhere."""

        def apply() -> None:
            self._cut = True
            for link in self._links:
                link.dead = True
                link.up.clear()
                link.down.clear()

        self._control(apply)

    def freeze(self) -> None:
        """A paused server: data is held both ways, and delivered in order at ``heal()``."""
        self._control(lambda: setattr(self, "_frozen", True))

    def delay(self, seconds: float) -> None:
        """Every chunk from the server reaches the client ``seconds`` late."""
        self._control(lambda: setattr(self, "_delay", seconds))

    def hang_one_in(self, n: int) -> None:
        """Every n-th chunk from the server (counted over all connections) and all that follow it
        on its connection are never delivered: that connection hangs, the others go on."""

        def apply() -> None:
            self._hang_every, self._replies = n, 0

        self._control(apply)

    def heal(self) -> None:
        """End every fault: held data goes out, cut and hung connections are closed, new ones work."""

        def apply() -> None:
            self._cut = self._frozen = False
            self._delay, self._hang_every = 0.0, 0
            for link in [link for link in self._links if link.dead or link.hung]:
                self._drop(link)

        self._control(apply)

    def _control(self, change: Callable[[], None]) -> None:
        """Apply ``change`` in the proxy's thread, between two chunks, and wait until it has."""
        if self._thread is None:
            change()
            return
        done = threading.Event()
        with self._lock:
            self._controls.append((change, done))
        self._wake()
        assert done.wait(10), "the proxy thread did not apply the change"

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer: the thread is being woken anyway
            self._waker.send(b"x")

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        next_due: float | None = None
        while not self._stopping:
            timeout = 1.0 if next_due is None else min(1.0, max(0.0, next_due - time.monotonic()))
            for key, _ in self._selector.select(timeout):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    self._drain_wakes()
                else:
                    link, from_client = key.data
                    if link in self._links:
                        self._receive(link, from_client)
            self._apply_controls()
            next_due = self._deliver_all()

    def _drain_wakes(self) -> None:
        try:
            while self._wake_end.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _apply_controls(self) -> None:
        while True:
            with self._lock:
                if not self._controls:
                    return
                change, done = self._controls.popleft()
            change()
            done.set()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        server = None
        if not self._cut:  # cut: accepted, but never connected through
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
            except OSError:  # the server is down: so is the connection
                client.close()
                return
            server.setblocking(False)
        client.setblocking(False)
        link = _Link(client, server, dead=self._cut)
        self._links.add(link)
        self._selector.register(client, selectors.EVENT_READ, (link, True))
        if server is not None:
            self._selector.register(server, selectors.EVENT_READ, (link, False))

    def _receive(self, link: _Link, from_client: bool) -> None:
        source = link.client if from_client else link.server
        assert source is not None
        try:
            data = source.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._selector.unregister(source)
            link.ended = True
            if link.dead or link.hung:
                self._drop(link)  # nothing will ever be delivered
            return  # else the link closes once what is held is delivered (a paused server still runs it)
        if link.dead:
            return  # lost in the partition
        if from_client:
            link.up.append((time.monotonic(), data))
            return
        if self._hang_every:
            self._replies += 1
            if self._replies % self._hang_every == 0:
                link.hung = True
        if not link.hung:
            link.down.append((time.monotonic() + self._delay, data))

    def _deliver_all(self) -> float | None:
        """Send what is due on every link; return when the next held chunk falls due, if any."""
        if self._frozen:
            return None
        next_due: float | None = None
        for link in list(self._links):
            for queue, target in ((link.up, link.server), (link.down, link.client)):
                due = self._deliver(link, queue, target)
                if link not in self._links:
                    break
                if due is not None:
                    next_due = due if next_due is None else min(next_due, due)
            if link in self._links and link.ended and not link.up and not link.down:
                self._drop(link)
        return next_due

    def _deliver(self, link: _Link, queue: deque[tuple[float, bytes]], target: socket.socket | None) -> float | None:
        """Send ``queue``'s due chunks, in order; return the due time of the first one left."""
        while queue and target is not None:
            due, data = queue[0]
            if due > time.monotonic():
                return due
            try:
                sent = target.send(data)
            except BlockingIOError:
                return time.monotonic() + 0.01  # the peer is not reading: try again shortly
            except OSError:
                self._drop(link)
                return None
            if sent < len(data):
                queue[0] = (due, data[sent:])
            else:
                queue.popleft()
        return None

    def _drop(self, link: _Link) -> None:
        """Close both ends of ``link`` and forget it."""
        self._links.discard(link)
        for sock in link.sockets():
            with contextlib.suppress(KeyError, ValueError):  # not registered, or no longer
                self._selector.unregister(sock)
            sock.close()
