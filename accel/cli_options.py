"""The command-line flags that choose a backend: --backend, --weights, --threads.

They live in refimpl/cli_common.py (the command line is refimpl's, and refimpl reaches accel only through
refimpl.accel_package()) and are re-exported here for accel's users.
"""
from refimpl.cli import BACKENDS, WEIGHT_FORMATS, add_backend_arguments, load_options

__all__ = ["BACKENDS", "WEIGHT_FORMATS", "add_backend_arguments", "load_options"]
