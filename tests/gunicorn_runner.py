"""Run an app under a real gunicorn on a free loopback port, for tests that need processes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gunicorn.config import KNOWN_SETTINGS
from servers import SECRET, free_port

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def gunicorn(
    app: str,
    env: dict[str, str] | None = None,
    *,
    workers: int = 2,
    threads: int = 1,
    preload: bool = False,
    args: tuple[str, ...] = (),
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``gunicorn app`` from the repository root; yield its base URL and process.

    ``env`` adds to the environment (SESSION_SECRET is set unless given). The server is
    stopped at the end; its log is printed when the block fails, to explain the failure.
    """
    port = free_port()
    full_env = {**os.environ, "SESSION_SECRET": SECRET, **(env or {})}
    command = [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
               "--threads", str(threads), "--graceful-timeout", "5", "--log-level", "info", *args]  # fmt: skip
    if preload:
        command.append("--preload")
    if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
        command.append("--no-control-socket")  # gunicorn 27+: parallel servers would share one per user
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gunicorn-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(port, process, log_path)
        yield f"http://127.0.0.1:{port}", process
    except BaseException:
        sys.stderr.write(log_path.read_text(errors="replace")[-5000:])
        raise
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def pid_log_config(directory: Path) -> Path:
    """A gunicorn --log-config-json file: wsgisession's lines at INFO, tagged with the pid of the
    process that wrote them (``wsgisession[<pid>] LEVEL message``)."""
    path = directory / "logging.json"
    path.write_text(json.dumps({
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": "WARNING", "handlers": ["console"]},
        "loggers": {"wsgisession": {"level": "INFO", "handlers": ["console"], "propagate": False}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "pid", "stream": "ext://sys.stdout"}},
        "formatters": {"pid": {"format": "wsgisession[%(process)d] %(levelname)s %(message)s"}},
    }))  # fmt: skip
    return path


def server_log(process: subprocess.Popen[bytes]) -> str:
    """What the gunicorn started by :func:`gunicorn` has logged so far."""
    port = next(a.split(":")[-1] for a in process.args if isinstance(a, str) and a.startswith("127.0.0.1:"))  # type: ignore[union-attr]
    return (Path(os.environ.get("TMPDIR", "/tmp")) / f"gunicorn-{port}.log").read_text(errors="replace")


def _wait_ready(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/__ready__")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not answer on port {port} within 30 s")
