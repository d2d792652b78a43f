"""Cluster state store: one contract (api.Store), SQLite and etcd backends."""

from .api import (
    KV,
    MAX_TXN_OPS,
    Compacted,
    Event,
    KVStoreError,
    LeaseNotFound,
    Store,
    StoreUnavailable,
    open_store,
)
from .sync import SyncStore

__all__ = [
    "KV",
    "MAX_TXN_OPS",
    "Compacted",
    "Event",
    "KVStoreError",
    "LeaseNotFound",
    "Store",
    "StoreUnavailable",
    "SyncStore",
    "open_store",
]
