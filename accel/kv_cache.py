"""A KV cache that is refimpl's past_key_values, backed by storage allocated once, on any backend.

refimpl passes the cache as a tuple of L (key, value) pairs, each [B, Hkv, T, Dh], and every forward returns a new
one made by concatenation (O(T) copying per token). `KVCache` is such a tuple too, so refimpl's models and checks
accept it, but its arrays are views of one buffer [L, 2, B, Hkv, C, Dh] with room for C positions: a forward
writes the new keys and values at T..T+S in place and returns a KVCache of length T+S over the same buffer.
The buffer lives in the backend's array module `xp` (NumPy for the numba backend, CuPy for cuda); `to_host()`
gives refimpl's tuples of NumPy arrays.

Passing a cache in never changes what an older KVCache shows: a forward appends in place only when the cache it
is given is the longest one over its buffer; given an older one (a branch) or a plain tuple, it copies first.
"""
from __future__ import annotations

import numpy as np

from refimpl.errors import InputError
from refimpl.inputs import past_length

GROWTH = 256  # a full cache grows by doubling, and by at least this many positions (or the new tokens)


def to_host(a):
    """A device (CuPy) array -> NumPy; NumPy arrays pass through."""
    get = getattr(a, "get", None)
    return np.asarray(get() if callable(get) else a)


class Storage:
    """The buffer [L, 2, B, Hkv, C, Dh] in array module xp, and how many positions of it are written."""

    def __init__(self, layers, batch, kv_heads, capacity, head_dim, xp=np):
        self.xp = xp
        self.data = xp.zeros((layers, 2, batch, kv_heads, capacity, head_dim), np.float32)
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
    def allocate(cls, layers, batch, kv_heads, capacity, head_dim, xp=np):
        """An empty cache (T = 0) with room for `capacity` positions: pass it as past_key_values to a first call."""
        return cls(Storage(layers, batch, kv_heads, max(int(capacity), 1), head_dim, xp), 0)

    @property
    def capacity(self):
        return self.storage.capacity

    def to_host(self):
        """refimpl's past_key_values: a tuple of L (key, value) NumPy arrays."""
        return tuple((to_host(k), to_host(v)) for k, v in self)

    def reorder(self, rows):
        """A cache whose row i is row rows[i] of this one (beam search's gather), in fresh storage."""
        storage = self.storage
        new = object.__new__(Storage)
        new.xp, new.filled = storage.xp, self.length
        new.data = storage.data[:, :, storage.xp.asarray(rows)]
        return KVCache(new, self.length)

    def __repr__(self):
        L, _, B, Hkv, C, Dh = self.storage.data.shape
        where = "" if self.storage.xp is np else f", on {self.storage.xp.__name__}"
        return (f"KVCache(layers={L}, batch={B}, kv_heads={Hkv}, length={self.length}, capacity={C}, "
                f"head_dim={Dh}{where})")


def _host_pairs(past):
    """Any past_key_values -> the same structure with host arrays, for refimpl's layout check (past_length)."""
    if not isinstance(past, (tuple, list)):
        return past
    return tuple(tuple(to_host(t) for t in pair) if isinstance(pair, (tuple, list)) else pair for pair in past)


def storage_for(past, layers, batch, kv_heads, head_dim, new, xp=np):
    """(storage in xp with room for `new` more positions after the past, T) for a forward given `past`.

    The latest KVCache of this array module with room is appended in place; an older or full one is copied
    (growing by doubling); refimpl's tuples (or a KVCache of another array module) are checked as refimpl checks
    them (refimpl.inputs.past_length) and copied in."""
    if past is None:
        return Storage(layers, batch, kv_heads, new, head_dim, xp), 0
    if isinstance(past, KVCache) and past.storage.xp is xp:
        shape = past.storage.data.shape
        if xp is np:
            past_length(past, layers, batch, kv_heads, head_dim)  # refimpl's own checks, on the views
        elif (shape[0], shape[2], shape[3], shape[5]) != (layers, batch, kv_heads, head_dim):
            raise InputError(f"past_key_values is a KVCache of {shape[0]} layers, [B, Hkv, T, Dh] = "
                             f"[{shape[2]}, {shape[3]}, T, {shape[5]}]; this call needs {layers} layers of "
                             f"[{batch}, {kv_heads}, T, {head_dim}]")
        T = past.length
        if past.storage.filled == T and past.storage.capacity >= T + new:
            return past.storage, T  # the common case: the latest cache, with room
        capacity = max(T + new, min(2 * past.storage.capacity, T + max(new, GROWTH)))
        storage = Storage(layers, batch, kv_heads, capacity, head_dim, xp)
        storage.data[:, :, :, :, :T] = past.storage.data[:, :, :, :, :T]
    else:
        host = _host_pairs(past)
        T = past_length(host, layers, batch, kv_heads, head_dim)
        storage = Storage(layers, batch, kv_heads, T + new, head_dim, xp)
        for i, (k, v) in enumerate(host):
            storage.data[i, 0, :, :, :T] = xp.asarray(np.asarray(k, dtype=np.float32))
            storage.data[i, 1, :, :, :T] = xp.asarray(np.asarray(v, dtype=np.float32))
    storage.filled = T
    return storage, T
