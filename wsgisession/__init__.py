"""Server-side sessions for any WSGI application, stored in Redis, PostgreSQL or SQLite."""

from .core import SessionCore
from .detection import create_session_store
from .middleware import SessionMiddleware
from .session import Loaded, Session, SessionTooLarge, SessionValueError
from .settings import ConfigError, Settings
from .stores import MemoryStore, SessionStore, SQLiteStore, StoreError
from .users import Device, UserSessions

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Device",
    "Loaded",
    "MemoryStore",
    "SQLiteStore",
    "Session",
    "SessionCore",
    "SessionMiddleware",
    "SessionStore",
    "SessionTooLarge",
    "SessionValueError",
    "Settings",
    "StoreError",
    "UserSessions",
    "__version__",
    "create_session_store",
]
