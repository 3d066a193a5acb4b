"""Writing files without losing any: an output path is checked before any work, and written atomically.

`refimpl golden -o PACK` once truncated whatever PACK named (the model's own model.safetensors included) and lost
the previous pack when a write failed. Now every file refimpl writes goes to a temporary file in the same folder and
is renamed over the target only when complete (os.replace is atomic on one file system), an existing file is
replaced only with --force, and a checkpoint folder's own files are never replaced.
"""
from __future__ import annotations

import fnmatch
import os
import tempfile

from .errors import InputError

# Names of the files that make a checkpoint (transformers', Meta's, llama.cpp's): never written over.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "params.json", "model*.safetensors", "*.index.json",
                    "pytorch_model*.bin", "consolidated.*.pth", "*.gguf", "tokenizer*", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json")


def is_checkpoint_file(path) -> bool:
    """A file of a checkpoint folder (one holding config.json or params.json), by its name."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    in_checkpoint = any(os.path.exists(os.path.join(folder, f)) for f in ("config.json", "params.json"))
    return (in_checkpoint or name.endswith(".gguf")) and any(fnmatch.fnmatch(name, p) for p in CHECKPOINT_FILES)


def check_output(path, force=False, flag="-o") -> str:
    """The path an output goes to, checked before any work: its folder exists, it is not a folder, it is no
    checkpoint's file, and it does not exist yet unless force."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a folder; give a file name")
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {path}: the folder {folder} does not exist")
    if is_checkpoint_file(path):
        raise InputError(f"{flag} {path}: is a checkpoint's own file name in a checkpoint folder; refimpl never "
                         "writes over a checkpoint (choose another name or folder)")
    if os.path.lexists(path) and not force:
        raise InputError(f"{flag} {path}: exists; refimpl does not overwrite files unless --force is given")
    return path


def write_atomically(path, write) -> None:
    """write(file object) into a temporary file beside `path`, flushed to disk, then renamed over `path`: a failure
    at any point leaves `path` as it was and no temporary file behind."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
