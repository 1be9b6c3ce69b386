"""ChunkStore: round trips, atomicity, and refusal of a foreign configuration."""

import json

import numpy as np
import pytest

from ensemble_fl.checkpoint import ChunkStore, ConfigMismatchError, array_digest


def _tree(seed, n=3):
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": rng.normal(size=(n, 4, 2)).astype(np.float32),
                    "bias": rng.normal(size=(n, 2)).astype(np.float32)},
          "conv": [rng.integers(0, 9, size=(n, 5)).astype(np.int32)]}


@pytest.mark.parametrize("indices", [[0], [2, 0, 1], [5, 7]])
def test_round_trip_and_completed(tmp_path, indices):
  store = ChunkStore(tmp_path / "run", {"a": 1})
  trees = {i: _tree(i) for i in indices}
  for i in indices:
    store.save(i, trees[i])
  assert store.completed() == sorted(indices)
  reopened = ChunkStore(tmp_path / "run", {"a": 1})
  for i in indices:
    got = reopened.load(i, like=_tree(99))
    for a, b in zip(jax_leaves(got), jax_leaves(trees[i])):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == b.dtype


def jax_leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def test_partial_write_is_not_a_chunk(tmp_path):
  store = ChunkStore(tmp_path, {"a": 1})
  store.save(0, _tree(0))
  # What a kill during np.savez leaves behind: a temporary file, never a chunk.
  (store.chunk_dir / "chunk_000001.npz.tmp1234").write_bytes(b"PK\x03\x04 truncated")
  assert store.completed() == [0]
  assert not store.has(1)


@pytest.mark.parametrize("new", [{"a": 2}, {"a": 1, "b": 0}, {"c": {"x": 1}}])
def test_different_fingerprint_is_refused(tmp_path, new):
  ChunkStore(tmp_path, {"a": 1, "c": {"x": 2}} if "c" in new else {"a": 1})
  with pytest.raises(ConfigMismatchError, match="different configuration"):
    ChunkStore(tmp_path, new)


def test_fingerprint_is_canonical(tmp_path):
  ChunkStore(tmp_path, {"shape": (3, 4), "n": np.int64(5), "z": 1.5})
  ChunkStore(tmp_path, {"z": 1.5, "n": 5, "shape": [3, 4]})  # same content, other spelling
  stored = json.loads((tmp_path / "manifest.json").read_text())
  assert stored == {"n": 5, "shape": [3, 4], "z": 1.5}


def test_load_rejects_wrong_structure(tmp_path):
  store = ChunkStore(tmp_path, {})
  store.save(0, _tree(0, n=3))
  with pytest.raises(ValueError, match="shape"):
    store.load(0, like=_tree(0, n=4))
  with pytest.raises(ValueError, match="arrays"):
    store.load(0, like={"only": np.zeros(3)})


def test_corrupt_manifest_is_reported(tmp_path):
  (tmp_path / "manifest.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    ChunkStore(tmp_path, {})


@pytest.mark.parametrize("change", ["value", "dtype", "shape"])
def test_array_digest_sees_every_change(change):
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = {"value": a + np.float32(1e-6) * (np.arange(6).reshape(2, 3) == 4),
       "dtype": a.astype(np.float64), "shape": a.reshape(3, 2)}[change]
  assert array_digest(a) == array_digest(a.copy())
  assert array_digest(a) != array_digest(b)
