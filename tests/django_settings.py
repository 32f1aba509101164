"""Django, configured once for the whole test process (its settings are process-global).

test_django.py and test_django_upstream.py both import this module, in either order. Django's
own ``tests/sessions_tests`` package (from its source distribution) is importable as
``sessions_tests``, and installed as an app: its tests module imports its models.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any
from urllib.parse import urlsplit

import django
from django.conf import settings
from servers import DATABASE_URL, SECRET, free_port, unique
from upstream import sdist

UPSTREAM_APP = "sessions_tests"
# Databases that only test_django_migrate.py uses (it routes Django's sessions app there), never connected
# otherwise: the shared PostgreSQL, in a schema of this process's own, and one where no server answers.
SESSIONS_DATABASE, DOWN_DATABASE = "sessions_pg", "sessions_down"
SESSIONS_SCHEMA = unique("django_sessions")
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]


def postgres(url: str, **options: Any) -> dict[str, Any]:
    """Django's DATABASES entry for a PostgreSQL URL."""
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": parts.username or "",
        "PASSWORD": parts.password or "",
        "HOST": parts.hostname or "",
        "PORT": parts.port or 5432,
        "OPTIONS": options,
    }


def import_upstream_app() -> None:
    """Import Django's tests/sessions_tests as a package, without putting the rest of Django's
    tests folder (hundreds of top-level names) on sys.path."""
    if UPSTREAM_APP in sys.modules:
        return
    folder = sdist("Django") / "tests" / UPSTREAM_APP
    spec = importlib.util.spec_from_file_location(
        UPSTREAM_APP, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[UPSTREAM_APP] = package
    spec.loader.exec_module(package)


if not settings.configured:
    import_upstream_app()
    settings.configure(
        SECRET_KEY=SECRET,
        DATABASES={
            # In memory, shared by the threads sync_to_async runs code in.
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": "file:wsgisession_tests?mode=memory&cache=shared",
            },
            SESSIONS_DATABASE: postgres(DATABASE_URL, options=f"-c search_path={SESSIONS_SCHEMA}"),
            DOWN_DATABASE: {**postgres(DATABASE_URL, connect_timeout=2), "PORT": free_port()},
        },
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
            "django.contrib.messages",
            UPSTREAM_APP,
        ],
        MIDDLEWARE=MIDDLEWARE,
        SESSION_ENGINE="wsgisession.frameworks.django",
        MESSAGE_STORAGE="django.contrib.messages.storage.session.SessionStorage",
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],  # fast, for tests only
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        USE_TZ=True,
    )
    django.setup()
