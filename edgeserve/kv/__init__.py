"""Paged KV: page layout, per-model page caches with prefix reuse, host-tier offload."""

from edgeserve.kv.cache import KVCache
from edgeserve.kv.layout import KVLayout
from edgeserve.kv.prefix import PrefixState, kv_identity

__all__ = ["KVCache", "KVLayout", "PrefixState", "kv_identity"]
