"""The frameworks' own test files, from their source distributions on PyPI, for running against our adapters.

Nothing of theirs is committed: each file is taken from the sdist of the version installed here,
downloaded once (``pip download``) into ``tests/.upstream/`` (ignored by git).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".upstream"


def sdist(distribution: str) -> Path:
    """The unpacked source distribution of the installed version of ``distribution``."""
    release = version(distribution)
    folder = CACHE / f"{distribution.lower()}-{release}"
    if not folder.is_dir():
        CACHE.mkdir(exist_ok=True)
        download = CACHE / "downloads"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", str(download), f"{distribution}=={release}"],
            check=True,
        )  # fmt: skip
        stem = f"{distribution}-{release}".lower().replace("_", "-")
        archive = next(p for p in download.iterdir() if p.name.lower().replace("_", "-").startswith(stem))
        unpacked = CACHE / "unpacking"
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        next(unpacked.iterdir()).rename(folder)
    return folder
