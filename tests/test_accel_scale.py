"""accel at real sizes, proven on small models: packing streams layer by layer into the weight cache (never a
float32 model in memory), large models go to the default cache, prompts dequantize a tile at a time.
The big runs are bench/bench_scale.py's."""
import os
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("numba", reason="accel needs Numba (pip install 'refimpl[accel]')")
if os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
    pytest.skip("whole models on pure-Python kernels are too slow", allow_module_level=True)

import refimpl  # noqa: E402
from refimpl_accel import convert, loader, packing as accel_model  # noqa: E402
from refimpl_accel.cpu import linear as quant  # noqa: E402

import checkpoint_files as cf  # noqa: E402
from test_stored_weights import write_llama  # noqa: E402

IDS = [[1, 5, 9, 2, 7, 3, 8, 4, 6, 11]]  # 10 rows: the prompt path (more than quant.SMALL_M rows)


def packed_arrays(params):
    for name, value in params.items():
        if name == "layers":
            for layer in value:
                yield from packed_arrays(layer)
        elif isinstance(value, quant.Weight):
            yield value.data
            if value.scales is not None:
                yield value.scales
        elif isinstance(value, np.ndarray):
            yield value


@pytest.mark.parametrize("weights", ["fp16", "bf16", "int8"])
def test_packing_into_the_cache_gives_the_in_memory_numbers(weights, tmp_path):
    """Streamed into cache_dir and memory-mapped back: every array is a map of the cache, outputs equal bit for bit
    those of the model packed in memory, and the converting load itself leaves no entry behind on failure."""
    folder = cf.safetensors_variant("llama_gqa_bias", tmp_path, "bf16")
    cached = refimpl.load(folder, backend="numba", weights=weights, cache_dir=tmp_path / "cache")
    assert all(not a.flags.owndata for a in packed_arrays(cached.params))  # views of the cache's memory maps
    in_memory = refimpl.load(folder, backend="numba", weights=weights)
    assert any(a.flags.owndata for a in packed_arrays(in_memory.params))
    for ids in (IDS, [[4]]):
        np.testing.assert_array_equal(cached(input_ids=ids).logits, in_memory(input_ids=ids).logits)
    (entry,) = os.listdir(tmp_path / "cache")
    assert os.path.exists(tmp_path / "cache" / entry / "manifest.json")


def test_packing_holds_one_layer_at_a_time(tmp_path, monkeypatch):
    """tracemalloc over a converting load into the cache: the peak stays under a third of the packed model (fp16,
    21 MB in 12 layers here: one layer's float32 stack is ~3 MB), where packing in memory needs all of it."""
    folder = str(tmp_path / "m")
    write_llama(folder, "fp16", layers=12, vocab=512)
    tracemalloc.start()
    try:
        model = refimpl.load(folder, backend="numba", weights="fp16", cache_dir=tmp_path / "cache")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    packed = model.weight_bytes()
    assert peak < packed / 3, f"peak {peak} B for {packed} B of packed weights"
    tracemalloc.start()
    try:
        refimpl.load(folder, backend="numba", weights="fp16")  # in memory: the bound above can fail
        _, in_memory_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert in_memory_peak >= packed


def test_large_models_go_to_the_default_cache_when_none_is_given(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loader, "IN_MEMORY_LIMIT", 0)
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path / "default"))
    folder = cf.safetensors_variant("opt_preln", tmp_path, "fp16")
    model = refimpl.load(folder, backend="numba", weights="int8")
    (entry,) = os.listdir(tmp_path / "default")
    assert entry.startswith("opt_preln") and "int8" in entry
    assert "converting the weights to int8 into" in capsys.readouterr().err
    again = refimpl.load(folder, backend="numba", weights="int8")  # memory-mapped from the cache, no conversion
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(model(input_ids=IDS).logits, again(input_ids=IDS).logits)


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_prompt_products_over_tiles_equal_one_whole_matrix(weights, tmp_path, monkeypatch):
    """Prompts dequantize TILE_ELEMENTS weights at a time into a scratch and multiply into a band of output columns;
    with tiles of 256 weights (many per matrix) the logits agree with one tile per matrix to within the float32
    reassociation that a GEMM over fewer output columns may pick (the dequantized weights are the same exactly)."""
    model = refimpl.load(os.path.join(cf.GOLDEN, "models", "llama_gqa_bias"), backend="numba", weights=weights)
    whole = model(input_ids=IDS).logits
    monkeypatch.setattr(quant, "TILE_ELEMENTS", 256)
    tiled = model(input_ids=IDS).logits
    assert tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)  # accel's own golden tolerance (test_accel_model)
