"""lmjax.interop.safetensors_io reads what safetensors itself writes, bfloat16 included, bit for bit."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.flax import save_file as save_jax
from safetensors.numpy import load_file

from lmjax.interop.safetensors_io import read_safetensors, read_weights, write_safetensors


def test_bfloat16_reads_exactly_as_float32(tmp_path):
    rng = np.random.default_rng(0)
    # Values a float32 → bfloat16 rounding leaves distinct, and the edge cases of the format.
    wide = rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16)
    edges = np.array([0.0, -0.0, 1e-40, -3.0e38, np.inf, -np.inf], ml_dtypes.bfloat16)
    saved = {"w": wide, "edges": edges, "f32": rng.standard_normal(3).astype(np.float32)}
    save_jax({k: jnp.asarray(v) for k, v in saved.items()}, str(tmp_path / "a.safetensors"))

    got = read_safetensors(tmp_path / "a.safetensors")
    assert sorted(got) == sorted(saved)
    for name, x in saved.items():
        assert got[name].dtype == np.float32 and got[name].shape == x.shape
        # bfloat16 is the top half of a float32: widening is exact, so the bits must match.
        np.testing.assert_array_equal(got[name].view(np.uint32), x.astype(np.float32).view(np.uint32))
    assert np.signbit(got["edges"][1]) and got["edges"][2] != 0  # -0.0 and a subnormal survive


def test_shards_merge_and_float32_round_trips(tmp_path):
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    b = {"y": np.linspace(-1, 1, 4, dtype=np.float32)}
    write_safetensors(a, tmp_path / "a.safetensors")
    write_safetensors(b, tmp_path / "b.safetensors")
    assert load_file(str(tmp_path / "a.safetensors"))["x"].dtype == np.float32
    got = read_weights([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert sorted(got) == ["x", "y"]
    np.testing.assert_array_equal(got["x"], a["x"])
    np.testing.assert_array_equal(got["y"], b["y"])
