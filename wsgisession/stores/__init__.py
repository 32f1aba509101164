"""Session stores. Each driver-backed store is imported from its own module, on demand."""

from .base import Changes, Record, SessionStore, StoreError
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["Changes", "MemoryStore", "Record", "SQLiteStore", "SessionStore", "StoreError"]
