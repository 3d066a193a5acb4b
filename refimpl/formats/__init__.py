"""Checkpoint file formats, one reader per file: safetensors, PyTorch zip `.bin` (without torch) and GGUF.

Each reader lists a file's tensors as `Stored` records (the file's dtype, shape, byte count and a `load()` that
returns the values) without touching the tensor bytes, so `refimpl inspect` and the loader share one code path.
Every reader treats its file as hostile and raises only refimpl.errors.CheckpointError. refimpl/weights.py is the
entry point; nothing here imports more than NumPy and the standard library (GGUF imports `gguf` when asked).
"""
