"""What operators look at: the live state of the session store, as JSON and as Prometheus metrics.

Mount either in the application (a load balancer's health check, a scraper)::

    from wsgisession.status import metrics_app, status_app

    status = status_app(middleware.store)   # GET: 200 and JSON while a store serves, 503 when none does
    metrics = metrics_app()                 # Prometheus text; needs pip install 'wsgisession[metrics]'
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .stores.base import SessionStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def status_app(store: SessionStore) -> WSGIApplication:
    """A WSGI app that answers with ``store.status()`` of the worker that serves the request:
    which store serves reads, each store's state (since when, switches, failures, latency), and
    the sessions awaiting a drop from the cache or a copy to the durable store."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        status = store.status()
        body = json.dumps(status).encode()
        start_response("200 OK" if status["ok"] else "503 Service Unavailable", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
        ])  # fmt: skip
        return [body]

    return app


def metrics_app() -> WSGIApplication:
    """Prometheus's WSGI app for the default registry, which holds wsgisession's metrics; under
    gunicorn with ``PROMETHEUS_MULTIPROC_DIR`` set, the sum over its workers.

    Raises :class:`ImportError` without ``prometheus_client`` (``pip install 'wsgisession[metrics]'``).
    """
    import prometheus_client
    from prometheus_client import multiprocess

    registry = prometheus_client.REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return prometheus_client.make_wsgi_app(registry)
