"""ChunkStore: round trips, atomicity, and refusal of a foreign configuration."""

import hashlib
import json
import shutil
import threading
import zipfile

import numpy as np
import pytest

from ensemble_fl.checkpoint import (ChunkStore, recorded_seconds, ConfigMismatchError, DamagedCheckpointError,
                                    array_digest)


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


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00", None])
def test_damaged_manifest_is_one_line_value_error(tmp_path, content):
  if content is None:  # a real manifest cut short, as by a full disk
    ChunkStore(tmp_path, {"lr": 0.1, "n": 3})
    content = (tmp_path / "manifest.json").read_bytes()[:9]
  (tmp_path / "manifest.json").write_bytes(content)
  with pytest.raises(DamagedCheckpointError, match="manifest.json is damaged, not valid JSON") as e:
    ChunkStore(tmp_path, {"lr": 0.1, "n": 3})
  assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
  assert "delete the run directory" in str(e.value)


@pytest.mark.parametrize("change", ["value", "dtype", "shape"])
def test_array_digest_sees_every_change(change):
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = {"value": a + np.float32(1e-6) * (np.arange(6).reshape(2, 3) == 4),
       "dtype": a.astype(np.float64), "shape": a.reshape(3, 2)}[change]
  assert array_digest(a) == array_digest(a.copy())
  assert array_digest(a) != array_digest(b)


# ---------------------------------------------------------------- every chunk carries its identity


def _npz(path):
  with np.load(path, allow_pickle=False) as data:
    return {name: data[name] for name in data.files}


@pytest.mark.parametrize("seconds, want", [
    ([], None),                      # no chunks
    ([1.5], 1.5),
    ([1.5, 2.25, 0.0], 3.75),        # sessions add up
    ([1.5, None], None),             # a chunk without its time: no total
])
def test_recorded_seconds_sums_every_chunk(tmp_path, seconds, want):
  store = ChunkStore(tmp_path, {"a": 1})
  for i, s in enumerate(seconds):
    store.save(i, {"w": np.full(2, i)}, seconds=s)
  assert recorded_seconds(tmp_path) == want
  # The time is in the header, outside the digest: the arrays still load.
  for i in range(len(seconds)):
    np.testing.assert_array_equal(store.load(i, {"w": np.zeros(2)})["w"], np.full(2, i))


def test_chunk_header_holds_fingerprint_index_and_digest(tmp_path):
  fingerprint = {"lr": 0.1, "shape": (3, 4)}
  store = ChunkStore(tmp_path, fingerprint)
  tree = _tree(0)
  store.save(4, tree)
  members = _npz(store.chunk_dir / "chunk_000004.npz")
  header = json.loads(members.pop("header").tobytes().decode())
  # Independent references: the fingerprint's canonical JSON, and the leaves in tree order.
  canonical = json.dumps({"lr": 0.1, "shape": [3, 4]}, sort_keys=True).encode()
  assert header["fingerprint"] == hashlib.sha256(canonical).hexdigest()
  assert header["index"] == 4
  leaves = jax_leaves(tree)
  assert sorted(members) == [f"leaf_{i:05d}" for i in range(len(leaves))]
  assert header["digest"] == array_digest(*leaves)


def _two_runs(tmp_path):
  """Run a (lr 0.1) with chunks 0-2 and run b (lr 0.2) with chunk 0, both complete stores."""
  a = ChunkStore(tmp_path / "a", {"lr": 0.1})
  for i in range(3):
    a.save(i, _tree(i))
  b = ChunkStore(tmp_path / "b", {"lr": 0.2})
  b.save(0, _tree(10))
  return a, b


def test_deleted_manifest_then_other_config_is_refused_and_not_claimed(tmp_path):
  a, _ = _two_runs(tmp_path)
  (a.run_dir / "manifest.json").unlink()
  with pytest.raises(ConfigMismatchError, match=r"chunk_000000\.npz was written by a run with a "
                     "different configuration"):
    ChunkStore(a.run_dir, {"lr": 0.01})
  # The folder was not claimed by the refused configuration: the original resumes.
  assert not (a.run_dir / "manifest.json").exists()
  again = ChunkStore(a.run_dir, {"lr": 0.1})
  assert json.loads((a.run_dir / "manifest.json").read_text()) == {"lr": 0.1}
  np.testing.assert_array_equal(again.load(2, like=_tree(0))["conv"][0], _tree(2)["conv"][0])


def test_chunk_of_another_run_is_refused(tmp_path):
  a, b = _two_runs(tmp_path)
  shutil.copy(b.chunk_dir / "chunk_000000.npz", a.chunk_dir / "chunk_000001.npz")
  with pytest.raises(ConfigMismatchError, match=r"chunk 1: .*chunk_000001\.npz was written by"):
    a.load(1, like=_tree(0))
  np.testing.assert_array_equal(a.load(0, like=_tree(0))["conv"][0], _tree(0)["conv"][0])


def test_chunk_copied_over_another_index_is_refused(tmp_path):
  a, _ = _two_runs(tmp_path)
  shutil.copy(a.chunk_dir / "chunk_000002.npz", a.chunk_dir / "chunk_000000.npz")
  with pytest.raises(DamagedCheckpointError, match=r"chunk_000000\.npz is misplaced \(it holds "
                     r"chunk 2, not chunk 0"):
    a.load(0, like=_tree(0))


def _rewrite(path, **changes):
  """Rewrites an npz with some members replaced: a tamper the zip's CRCs cannot see."""
  members = {**_npz(path), **changes}
  with open(path, "wb") as f:
    np.savez(f, **members)


def _damage(path, how):
  raw = path.read_bytes()
  if how == "truncated":
    path.write_bytes(raw[: len(raw) // 2])
  elif how == "empty":
    path.write_bytes(b"")
  elif how == "bit_flip":  # inside the first member's data: the zip CRC catches it
    with zipfile.ZipFile(path) as z:
      info = z.infolist()[0]
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 1
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:])
  elif how == "text":
    path.write_text("not a chunk")
  elif how == "npy":
    with open(path, "wb") as f:
      np.save(f, np.zeros(3))
  elif how == "values":  # a leaf changed, zip intact, header kept
    members = _npz(path)
    _rewrite(path, leaf_00000=members["leaf_00000"] + np.float32(1))
  elif how == "no_header":  # what the previous format wrote
    members = _npz(path)
    del members["header"]
    with open(path, "wb") as f:
      np.savez(f, **members)
  elif how == "bad_header":
    _rewrite(path, header=np.frombuffer(b"{", np.uint8))


@pytest.mark.parametrize("how", ["truncated", "empty", "bit_flip", "text", "npy", "values",
                                 "no_header", "bad_header"])
def test_damaged_chunk_is_never_used_and_named(tmp_path, how):
  store = ChunkStore(tmp_path, {"a": 1})
  store.save(0, _tree(0))
  store.save(1, _tree(1))
  path = store.chunk_dir / "chunk_000001.npz"
  _damage(path, how)
  with pytest.raises(DamagedCheckpointError) as e:
    store.load(1, like=_tree(0))
  message = str(e.value)
  assert str(path) in message and "\n" not in message
  assert "is corrupt" in message and "delete this file and rerun to train chunk 1 again" in message
  if how == "values":
    assert "digest" in message
  np.testing.assert_array_equal(store.load(0, like=_tree(0))["conv"][0], _tree(0)["conv"][0])


def test_damaged_chunk_blocks_reclaiming_a_folder_without_manifest(tmp_path):
  store = ChunkStore(tmp_path, {"a": 1})
  store.save(0, _tree(0))
  (tmp_path / "manifest.json").unlink()
  _damage(store.chunk_dir / "chunk_000000.npz", "truncated")
  with pytest.raises(DamagedCheckpointError, match="chunk_000000.npz is corrupt"):
    ChunkStore(tmp_path, {"a": 1})


@pytest.mark.parametrize("trial", range(10))
def test_racing_stores_with_different_fingerprints_cannot_both_win(tmp_path, trial):
  # Both threads pass the "no manifest yet" point together; exactly one may claim the folder.
  barrier = threading.Barrier(2)
  outcome = {}

  def open_store(lr):
    barrier.wait()
    try:
      ChunkStore(tmp_path, {"lr": lr, "pad": "x" * 20_000})
      outcome[lr] = "won"
    except ConfigMismatchError:
      outcome[lr] = "refused"

  threads = [threading.Thread(target=open_store, args=(lr,)) for lr in (0.1, 0.2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(outcome.values()) == ["refused", "won"]
  winner = next(lr for lr, result in outcome.items() if result == "won")
  assert json.loads((tmp_path / "manifest.json").read_text())["lr"] == winner
  assert [p.name for p in tmp_path.iterdir() if p.name != "chunks"] == ["manifest.json"]
