"""The command-line flags that choose a backend: --backend, --weights, --threads.

They live in refimpl/cli.py (the command line is refimpl's; accel imports refimpl, never the reverse) and are
re-exported here for accel's users.
"""
from refimpl.cli import BACKENDS, WEIGHT_FORMATS, add_backend_arguments, load_options

__all__ = ["BACKENDS", "WEIGHT_FORMATS", "add_backend_arguments", "load_options"]
