"""Converted weights on disk: packed once, then memory-mapped by every later load (no conversion, little RSS).

A folder cache_dir/<checkpoint name>-<format>-<fingerprint>/ holds one .npy file per array of the packed parameter
tree and manifest.json, which lists them and which entries are the same Weight (tied embeddings). The fingerprint
covers the checkpoint's files (name, size, modification time) and this layout's version, so a changed checkpoint
is converted again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from .quant import Weight

LAYOUT_VERSION = 1


def fingerprint(path, fmt):
    """A short hash of the checkpoint files and the format."""
    path = os.path.realpath(os.fspath(path))
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    h = hashlib.sha256(f"{LAYOUT_VERSION}:{fmt}".encode())
    for f in files:
        if os.path.isfile(f):
            st = os.stat(f)
            h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def folder_for(cache_dir, path, fmt):
    name = os.path.basename(os.path.normpath(os.fspath(path))) or "model"
    return os.path.join(os.fspath(cache_dir), f"{name}-{fmt}-{fingerprint(path, fmt)}")


def _flatten(params):
    """Param tree -> [(dotted name, leaf)] with layers as "layers.N.name"."""
    items = []
    for name, value in params.items():
        if name == "layers":
            for i, layer in enumerate(value):
                items += [(f"layers.{i}.{k}", v) for k, v in layer.items()]
        else:
            items.append((name, value))
    return items


def save(params, folder):
    """Write the packed tree into `folder` (atomically: a temporary folder renamed into place)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=".converting-")
    manifest, seen = {"version": LAYOUT_VERSION, "entries": {}}, {}
    for name, leaf in _flatten(params):
        if id(leaf) in seen:
            manifest["entries"][name] = {"same_as": seen[id(leaf)]}
            continue
        seen[id(leaf)] = name
        if isinstance(leaf, Weight):
            np.save(os.path.join(work, name + ".npy"), leaf.data)
            entry = {"weight": leaf.format}
            if leaf.scales is not None:
                np.save(os.path.join(work, name + ".scales.npy"), leaf.scales)
        else:
            np.save(os.path.join(work, name + ".npy"), np.asarray(leaf))
            entry = {"array": True}
        manifest["entries"][name] = entry
    with open(os.path.join(work, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    try:
        os.rename(work, folder)
    except OSError:  # another process converted it first
        shutil.rmtree(work, ignore_errors=True)


def _mapped(file):
    """A .npy file memory-mapped copy-on-write, as a plain writable ndarray (the array type every kernel compiled
    for: a read-only array would be another Numba specialisation)."""
    return np.load(file, mmap_mode="c").view(np.ndarray)


def load(folder):
    """The packed tree saved by save(), every array memory-mapped; None when the folder is absent or stale."""
    manifest_file = os.path.join(folder, "manifest.json")
    if not os.path.exists(manifest_file):
        return None
    with open(manifest_file, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("version") != LAYOUT_VERSION:
        return None
    leaves = {}
    for name, entry in manifest["entries"].items():
        if "same_as" in entry:
            leaves[name] = leaves[entry["same_as"]]
            continue
        data = _mapped(os.path.join(folder, name + ".npy"))
        if "weight" in entry:
            scales_file = os.path.join(folder, name + ".scales.npy")
            scales = _mapped(scales_file) if os.path.exists(scales_file) else None
            leaves[name] = Weight(entry["weight"], data, scales)
        else:
            leaves[name] = data
    params = {"layers": []}
    for name, leaf in leaves.items():
        if name.startswith("layers."):
            _, index, key = name.split(".", 2)
            while len(params["layers"]) <= int(index):
                params["layers"].append({})
            params["layers"][int(index)][key] = leaf
        else:
            params[name] = leaf
    return params
