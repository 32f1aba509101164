"""One store as this process sees it: up or down, since when, how often it failed, how fast it answers.

Plain state and decisions, no I/O: :class:`~wsgisession.stores.failover.FailoverStore` feeds it
what its commands and its probe found, and acts on what it answers. Counts also go to Prometheus
when ``prometheus_client`` is installed (see :mod:`wsgisession.status`).
"""

from __future__ import annotations

import enum
import math
import threading
import time
from typing import Any

from .base import after_fork

try:
    import prometheus_client
except ImportError:  # an extra: pip install 'wsgisession[metrics]'
    prometheus_client = None  # type: ignore[assignment]

#: the weight of the newest command in the moving average of latency (about the last five count)
SMOOTHING = 0.2
#: a store that fails again within this many probe intervals of coming back is flapping: it must
#: then answer for twice as long as last time before it is trusted again, up to this many intervals
FLAP_WINDOW = 30
MAX_HOLD = 32


class State(enum.Enum):
    """How this process uses a store."""

    UP = "up"  #: read and written
    RETURNING = "returning"  #: written, not yet read: another process may still write around it
    DOWN = "down"  #: neither: it failed, or answers too slowly


class Health:
    """The state of one store in this process, and the rules that move it.

    With a latency ``budget`` (seconds), a store whose commands take longer than that on a moving
    average is as good as down; and one that went down must answer every probe within the budget
    for a while before it is used again: not at all the first time, then longer for each time it
    went down again soon after coming back, so that a store failing one command in ten does not
    make every process switch back and forth.
    """

    def __init__(self, name: str, up: bool, probe_interval: float, budget: float | None = None) -> None:
        self.name = name
        self.state = State.UP if up else State.DOWN
        self.since = time.time()
        self.switches = 0
        self.failures = 0
        self.latency = 0.0  # the moving average of a command's seconds
        self.budget = budget
        self.probe_interval = probe_interval
        self._flaps = 0
        self._back_at = -math.inf  # monotonic time it last came back from down
        self._answering_since: float | None = None
        self._lock = threading.Lock()
        metrics.up(name, up)
        after_fork(self, Health._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # it may have been held by a thread the fork left behind
        metrics.up(self.name, self.up)  # the child's own gauge

    @property
    def up(self) -> bool:
        """Whether reads may use the store."""
        return self.state is State.UP

    @property
    def writable(self) -> bool:
        """Whether writes go to the store."""
        return self.state is not State.DOWN

    def failed(self) -> bool:
        """A command or a probe failed (or was too slow): count it and mark the store down; True if
        this switched it."""
        self.failures += 1
        self._answering_since = None
        metrics.failed(self.name)
        return self._switch(State.DOWN)

    def returning(self, expected: State) -> bool:
        """Write to the store, but read it no more (or not yet), if it is still ``expected`` (a switch
        made meanwhile, by a failing request, wins); True if this switched it."""
        return self._switch(State.RETURNING, expected)

    def took(self, seconds: float) -> bool:
        """A command answered in ``seconds``; True when that makes the average pass the budget."""
        self.latency += SMOOTHING * (seconds - self.latency)
        return self.budget is not None and self.latency > self.budget and self.writable

    def answered(self, seconds: float) -> bool:
        """The probe found a down store answering in ``seconds``: True when it has answered within
        the budget for long enough to be used again."""
        if self.budget is not None and seconds > self.budget:
            self._answering_since = None
            return False
        started = self._answering_since = self._answering_since or time.monotonic()
        return time.monotonic() - started >= self.hold

    @property
    def hold(self) -> float:
        """How long a down store must answer before it is used again."""
        return self.probe_interval * min((1 << self._flaps) - 1, MAX_HOLD)

    def back(self, expected: State) -> bool:
        """Mark the store up again, if it is still ``expected``; True if this switched it."""
        return self._switch(State.UP, expected)

    def _switch(self, state: State, expected: State | None = None) -> bool:
        with self._lock:
            if self.state is state or (expected is not None and self.state is not expected):
                return False
            was, self.state, self.since = self.state, state, time.time()
            self.switches += 1
            now = time.monotonic()
            if state is State.DOWN:
                recent = now - self._back_at < FLAP_WINDOW * self.probe_interval
                self._flaps = self._flaps + 1 if recent else 0
                self._answering_since = None
            elif was is State.DOWN:
                self._back_at = now
                self.latency = 0.0  # measured again from now on
        metrics.switched(self.name, state)
        return True

    def status(self) -> dict[str, Any]:
        """JSON-ready: the state, since when (Unix seconds), the counts, the average latency."""
        return {
            "state": self.state.value,
            "since": round(self.since, 3),
            "switches": self.switches,
            "failures": self.failures,
            "latency_ms": round(self.latency * 1000, 3),
        }


class Metrics:
    """The Prometheus side of :class:`Health`: counters and gauges, or nothing without prometheus_client.

    Correct under gunicorn's several workers in prometheus_client's multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``): counters add up, gauges count the live workers.
    """

    def __init__(self) -> None:
        if prometheus_client is None:
            return
        label = ["store"]
        self.switches = prometheus_client.Counter(
            "wsgisession_switches", "Times a process marked a store down, or up again", ["store", "to"]
        )
        self.failures = prometheus_client.Counter(
            "wsgisession_store_failures", "Failed commands and probes of a store", label
        )
        self.up_gauge = prometheus_client.Gauge(
            "wsgisession_store_up", "Processes that read sessions from the store", label, multiprocess_mode="livesum"
        )
        self.awaiting_drop = prometheus_client.Gauge(
            "wsgisession_awaiting_drop", "Cached copies marked out of date, not yet dropped", multiprocess_mode="max"
        )
        self.awaiting_copy = prometheus_client.Gauge(
            "wsgisession_awaiting_copy", "Sessions changed while the durable store was away, not yet copied to it",
            multiprocess_mode="livesum",
        )  # fmt: skip

    def up(self, store: str, up: bool) -> None:
        if prometheus_client is not None:
            self.up_gauge.labels(store).set(int(up))

    def failed(self, store: str) -> None:
        if prometheus_client is not None:
            self.failures.labels(store).inc()

    def switched(self, store: str, state: State) -> None:
        if prometheus_client is not None:
            self.switches.labels(store, state.value).inc()
            self.up_gauge.labels(store).set(int(state is State.UP))

    def backlog(self, drop: int | None, copy: int) -> None:
        if prometheus_client is not None:
            if drop is not None:
                self.awaiting_drop.set(drop)
            self.awaiting_copy.set(copy)


metrics = Metrics()
