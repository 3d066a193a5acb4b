"""The object a forward pass returns: transformers' attribute names, NumPy arrays inside."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class ModelOutput:
    """Fields a class does not produce stay None. past_key_values is a tuple of (key, value) per layer,
    each [B, Hkv, K, Dh]; hidden_states and attentions are tuples (L + 1 and L entries)."""

    loss: object = None
    logits: object = None
    start_logits: object = None
    end_logits: object = None
    last_hidden_state: object = None
    past_key_values: tuple | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None

    def __getitem__(self, key: str):
        if not isinstance(key, str):
            raise TypeError("index a ModelOutput by field name, e.g. out['logits']")
        return getattr(self, key)

    def keys(self):
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]
