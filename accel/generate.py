"""accel's part in generate: three hooks; the loop, settings, processors and samplers are refimpl.generate's.

refimpl.generate runs greedy, sampling and beam search for every model through generation_forward,
generation_cache and reorder_cache. accel's models (every backend) supply these, so every generation option is
implemented once, and a seed gives refimpl's tokens:
  - generation_forward runs the decoder on a KVCache and computes the last position's logits only;
  - generation_cache starts with room for the prompt and GENERATION_CHUNK more positions; the cache then grows
    in chunks as tokens come (kv_cache.storage_for), so max_new_tokens=10**9 allocates nothing up front;
  - reorder_cache gathers beam search's rows into fresh storage.
"""
from __future__ import annotations

GENERATION_CHUNK = 256  # positions of room beyond the prompt; growth adds up to 256 more at a time


class GenerationHooks:
    """generation_forward, generation_cache and reorder_cache for a model with _decoder_call and _last_logits."""

    def generation_forward(self, ids, mask, positions, cache, output_attentions=False, output_hidden_states=False):
        """One generate step: (logits of the last position [N, V] float32 on the host, the forward's outputs)."""
        h, out = self._decoder_call(ids, mask, positions, cache, output_attentions, output_hidden_states)
        return self._last_logits(h), out

    def generation_cache(self, rows, prompt_length, max_length):
        """An empty cache with room for the prompt and GENERATION_CHUNK new positions (fewer when max_length is)."""
        return self.new_cache(rows, min(max_length, prompt_length + GENERATION_CHUNK))

    def reorder_cache(self, cache, rows):
        """Beam search's gather (refimpl's reorder_cache), on the cache's own storage."""
        return cache.reorder(rows)
