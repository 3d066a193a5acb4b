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
import sys
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


def save(params, folder, progress=False):
    """Write a packed tree into `folder` (atomically: a temporary folder renamed into place)."""
    save_entries(_flatten(params), folder, progress)


def save_entries(entries, folder, progress=False):
    """Write (dotted name, leaf) entries into `folder` one at a time, atomically (a temporary folder renamed into
    place). `entries` may be a generator that packs each layer only when it is reached (accel.model.iter_packed):
    then no more than one packed layer is ever in memory, whatever the model's size."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=".converting-")
    try:
        manifest, seen, layer = {"version": LAYOUT_VERSION, "entries": {}}, {}, None
        for name, leaf in entries:
            if progress and name.startswith("layers.") and name.split(".")[1] != layer:
                layer = name.split(".")[1]
                print(f"refimpl: converting layer {layer}", file=sys.stderr, flush=True)
            if id(leaf) in seen:  # a tied lm_head: the embedding's Weight
                manifest["entries"][name] = {"same_as": seen[id(leaf)][0]}
                continue
            if not name.startswith("layers."):  # only top-level entries are ever shared; kept alive so that
                seen[id(leaf)] = (name, leaf)  # a freed layer's object id cannot be mistaken for one of them
            manifest["entries"][name] = _save_leaf(work, name, leaf)
        with open(os.path.join(work, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f)
        os.rename(work, folder)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
        if not os.path.exists(os.path.join(folder, "manifest.json")):
            raise
        # else another process converted it first
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _save_leaf(work, name, leaf):
    if isinstance(leaf, Weight):
        np.save(os.path.join(work, name + ".npy"), leaf.data)
        if leaf.scales is not None:
            np.save(os.path.join(work, name + ".scales.npy"), leaf.scales)
        return {"weight": leaf.format}
    np.save(os.path.join(work, name + ".npy"), np.asarray(leaf))
    return {"array": True}


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
