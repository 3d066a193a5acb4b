"""A KV cache that is refimpl's past_key_values, backed by storage allocated once.

refimpl passes the cache as a tuple of L (key, value) pairs, each [B, Hkv, T, Dh], and every forward returns a new
one made by concatenation (O(T) copying per token). `KVCache` is such a tuple too, so refimpl's models and checks
accept it, but its arrays are views of one buffer [L, 2, B, Hkv, C, Dh] with room for C positions: a forward
writes the new keys and values at T..T+S in place and returns a KVCache of length T+S over the same buffer.

Passing a cache in never changes what an older KVCache shows: a forward appends in place only when the cache it
is given is the longest one over its buffer; given an older one (a branch) or a plain tuple, it copies first.
"""
from __future__ import annotations

import numpy as np


class _Storage:
    """The buffer [L, 2, B, Hkv, C, Dh] and how many positions of it are written."""

    def __init__(self, layers, batch, kv_heads, capacity, head_dim):
        self.data = np.zeros((layers, 2, batch, kv_heads, capacity, head_dim), np.float32)
        self.filled = 0

    @property
    def capacity(self):
        return self.data.shape[4]


class KVCache(tuple):
    """past_key_values: L pairs (key, value) [B, Hkv, T, Dh], views of a preallocated buffer with room to grow."""

    def __new__(cls, storage, length):
        pairs = tuple((storage.data[i, 0, :, :, :length], storage.data[i, 1, :, :, :length])
                      for i in range(storage.data.shape[0]))
        cache = super().__new__(cls, pairs)
        cache.storage = storage
        cache.length = length
        return cache

    @classmethod
    def allocate(cls, layers, batch, kv_heads, capacity, head_dim):
        """An empty cache (T = 0) with room for `capacity` positions: pass it as past_key_values to a first call."""
        return cls(_Storage(layers, batch, kv_heads, max(int(capacity), 1), head_dim), 0)

    @property
    def capacity(self):
        return self.storage.capacity

    def __repr__(self):
        L, _, B, Hkv, C, Dh = self.storage.data.shape
        return f"KVCache(layers={L}, batch={B}, kv_heads={Hkv}, length={self.length}, capacity={C}, head_dim={Dh})"


def storage_for(past, layers, batch, kv_heads, head_dim, new):
    """(storage with room for `new` more positions after the past, T) for a forward given `past` (None, a plain tuple
    or a KVCache). Appends in place when it can, else copies the past into fresh storage (growing by doubling)."""
    if past is None:
        return _Storage(layers, batch, kv_heads, new, head_dim), 0
    T = int(np.shape(past[0][0])[2])
    if isinstance(past, KVCache) and past.storage.filled == T and past.storage.capacity >= T + new:
        return past.storage, T  # the common case: the latest cache, with room
    capacity = T + new
    if isinstance(past, KVCache):
        capacity = max(capacity, min(2 * past.storage.capacity, T + max(new, 256)))
    storage = _Storage(layers, batch, kv_heads, capacity, head_dim)
    for i, (k, v) in enumerate(past):
        storage.data[i, 0, :, :, :T] = k
        storage.data[i, 1, :, :, :T] = v
    storage.filled = T
    return storage, T
