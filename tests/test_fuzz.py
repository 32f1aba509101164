"""A short coverage-guided fuzzing run (atheris / libFuzzer) of the cookie path.

Run as a script, this file is the fuzz target: fuzzer bytes, decoded as latin-1 (what a WSGI
server puts in ``environ``) and as UTF-8 with surrogateescape, go through
SessionCore.cookie_values, identify and Signer.unsign, and then through a whole request.
Any exception, or a request that names a session its header does not carry, is a crash.
atheris ends the process itself (sys.exit), so the tests run it in a subprocess, bounded by a
number of runs and a time limit.

    python tests/test_fuzz.py -runs=200000 CORPUS_DIR    # a longer run by hand
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

RUNS = 50000
MAX_TOTAL_TIME = 20  # seconds; whichever bound comes first ends the run
SELF_TEST = "WSGISESSION_FUZZ_SELF_TEST"


def _target() -> None:
    """The fuzz target (this file run as a script): set up, write the seed corpus, fuzz."""
    import base64
    import hashlib
    import json
    import logging
    import time

    import atheris
    import werkzeug.http  # noqa: F401 - imported uninstrumented: only wsgisession is measured

    with atheris.instrument_imports(include=["wsgisession"]):
        from wsgisession import MemoryStore, SessionMiddleware
        from wsgisession.signing import Signer, store_key

    logging.getLogger("wsgisession").addHandler(logging.NullHandler())
    logging.getLogger("wsgisession").propagate = False
    secrets = ["fuzz-secret-0123456789-abcdefghijklmnopqrstuvwxyz", "fuzz-older-9876543210-ZYXWVUTSRQPONMLKJIHGFEDCBA"]
    now = int(time.time())
    ids = [base64.urlsafe_b64encode(hashlib.sha256(f"fuzz-id-{i}".encode()).digest()).decode()[:43] for i in range(2)]
    store = MemoryStore()
    for index, session_id in enumerate(ids):
        store.create(store_key(session_id), {"user": json.dumps(f"user{index}")}, 3600)

    def app(environ: dict, start_response: object) -> list[bytes]:
        body = json.dumps(dict(environ["session"])).encode()
        start_response("200 OK", [("Content-Type", "application/json")])  # type: ignore[operator]
        return [body]

    mw = SessionMiddleware(
        app, store, secret=secrets, cookie_name="session", max_age=3600, absolute_timeout=86400, cookie_secure=False
    )
    minted = {Signer([s]).sign(i, now): i for i in ids for s in secrets}
    self_test = os.environ.get(SELF_TEST) == "1"

    def one_input(data: bytes) -> None:
        for header in (data.decode("latin-1"), data.decode("utf-8", "surrogateescape")):
            values = mw.core.cookie_values(header)
            for value in values:
                result = mw.core.format.signer.unsign(value)
                if result is not None and value not in minted:
                    raise AssertionError(f"accepted a value that was never minted: {value!r}")
            if mw.core.format.signer.unsign(header) is not None and header not in minted:
                raise AssertionError(f"accepted a header that was never minted: {header!r}")
            found = mw.core.identify(values)
            if found is not None:
                if self_test:
                    raise AssertionError("self-test: the fuzzer reached a genuine cookie")
                if not any(v in header and i == found[0] for v, i in minted.items()):
                    raise AssertionError(f"named session {found[0]!r} whose cookie the header lacks: {header!r}")
            statuses: list[str] = []
            body = b"".join(
                mw({"HTTP_COOKIE": header}, lambda status, headers, exc=None, seen=statuses: seen.append(status))
            )
            expected = {} if found is None else {"user": f"user{ids.index(found[0])}"}
            if statuses != ["200 OK"] or json.loads(body) != expected:
                raise AssertionError(f"request with {header!r} answered {statuses} {body!r}, expected {expected}")

    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus and not os.listdir(corpus[0]):
        one, two = (Signer([secrets[0]]).sign(i, now) for i in ids)
        old = Signer([secrets[1]]).sign(ids[0], now)
        seeds = [
            f"session={one}",
            f'theme=dark; session="{one}"; lang=en',
            f"session={one}; session={two}",
            f"session={old}; session={one}",
            f"session={one[:-1]}",
            f"session={one}; " + "x" * 8100,
            "session=",
        ]
        for n, seed in enumerate(seeds):
            Path(corpus[0], f"seed{n}").write_bytes(seed.encode("latin-1"))
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def _fuzz(tmp_path: Path, self_test: bool = False) -> subprocess.CompletedProcess[str]:
    import pytest

    if importlib.util.find_spec("atheris") is None:
        pytest.fail("atheris is not installed: pip install 'wsgisession[test]' (or pip install atheris)")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_")}
    if self_test:
        env[SELF_TEST] = "1"
    command = [
        sys.executable, __file__, f"-runs={RUNS}", f"-max_total_time={MAX_TOTAL_TIME}", "-seed=20240601",
        "-max_len=9000", "-timeout=10", f"-artifact_prefix={tmp_path}/", str(corpus),
    ]  # fmt: skip
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_fuzzing_the_cookie_path_finds_no_crash(tmp_path: Path) -> None:
    run = _fuzz(tmp_path)
    output = run.stdout + run.stderr
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    assert run.returncode == 0 and not crashes, output[-5000:]
    assert "Done " in output and " runs in " in output, output[-2000:]  # the run happened, to its bound


def test_the_fuzz_target_reports_a_failure(tmp_path: Path) -> None:
    """The harness is able to fail: told to treat a genuine cookie as a crash, it stops on the seeds."""
    run = _fuzz(tmp_path, self_test=True)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-2000:]
    assert "self-test: the fuzzer reached a genuine cookie" in output, output[-2000:]
    assert any(p.name.startswith("crash-") for p in tmp_path.iterdir()), output[-2000:]


if __name__ == "__main__":
    _target()
