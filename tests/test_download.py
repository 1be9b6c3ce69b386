"""Downloads into the cache, served by a local HTTP server on 127.0.0.1.

Nothing here touches the network: every URL is the local server's or a closed
local port, and the autouse fixture points both override variables at a
closed port, so a download that escapes a test's setup fails at once.
The shared data folder is hidden (``paths.SHARED_DIRS = ()``) and HOME and
XDG_CACHE_HOME are empty tmp folders: each test sees a fresh machine.
"""

import fcntl
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ensemble_fl.data import download, har, mnist, paths

REPO = Path(__file__).resolve().parents[1]
SHARED = paths.SHARED_DIRS[0]  # captured before the fixture hides it
SHARED_MNIST = SHARED / "mnist"
needs_mnist = pytest.mark.skipif(
    not all((SHARED_MNIST / f).is_file() for f in mnist.FILES),
    reason=f"MNIST .gz files not found in {SHARED_MNIST}")


def _closed_port_url() -> str:
  """A URL on 127.0.0.1 where nothing listens (connection refused at once)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def fresh_machine(tmp_path, monkeypatch):
  """An empty home and cache, no shared data, no proxies, no way out."""
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv(paths.ENV_VAR, raising=False)
  for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
  closed = _closed_port_url()
  monkeypatch.setenv(mnist.URL_ENV, closed)
  monkeypatch.setenv(har.UCI_URL_ENV, closed + "uci.zip")
  monkeypatch.setattr(paths, "SHARED_DIRS", ())
  return tmp_path / "xdg" / paths.CACHE_NAME


class Server:
  """Serves ``files[path]`` bytes; ``cut[path]`` = bytes to send before hanging up."""

  def __init__(self):
    self.files: dict[str, bytes] = {}
    self.cut: dict[str, int] = {}
    self.hits: list[str] = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        server.hits.append(self.path)
        body = server.files.get(self.path)
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:server.cut.get(self.path, len(body))])
        self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join(timeout=5)


@pytest.fixture
def server():
  s = Server()
  yield s
  s.close()


def _leftovers(folder: Path) -> list[str]:
  return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _one_line(err) -> str:
  msg = str(err.value)
  assert "\n" not in msg, msg
  return msg


# ------------------------------------------------------------------ cache folder


def test_cache_dir_follows_env(monkeypatch, tmp_path):
  assert paths.cache_dir() == tmp_path / "xdg" / "ensemble_fl"
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG rule: absolute only
  assert paths.cache_dir() == tmp_path / "home" / ".cache" / "ensemble_fl"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert paths.cache_dir() == tmp_path / "home" / ".cache" / "ensemble_fl"
  assert paths.candidate_data_dirs() == [paths.cache_dir()]
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "mine"))
  assert paths.cache_dir() == paths.default_data_dir() == tmp_path / "mine"
  assert paths.candidate_data_dirs() == [tmp_path / "mine"]


# ------------------------------------------------------------------ download.fetch


def _blob(n=100_000, seed=0) -> bytes:
  return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def test_fetch_verifies_and_reports_progress(server, tmp_path):
  body = _blob()
  server.files["/f.bin"] = body
  out = io.StringIO()
  dest = download.fetch([server.url + "/f.bin"], tmp_path / "c" / "f.bin",
                        sha256=hashlib.sha256(body).hexdigest(), stream=out)
  assert dest.read_bytes() == body and _leftovers(tmp_path / "c") == ["f.bin"]
  assert "f.bin" in out.getvalue() and "100.0 kB/100.0 kB" in out.getvalue()
  assert "B/s" in out.getvalue()


def test_flipped_byte_is_refused_and_nothing_kept(server, tmp_path):
  body = _blob()
  bad = bytearray(body)
  bad[5000] ^= 0x01
  server.files["/f.bin"] = bytes(bad)
  with pytest.raises(download.DownloadError) as err:
    download.fetch([server.url + "/f.bin"], tmp_path / "c" / "f.bin",
                   sha256=hashlib.sha256(body).hexdigest(), offline_hint="Offline: copy it.")
  msg = _one_line(err)
  assert server.url + "/f.bin" in msg and "SHA-256" in msg and "Offline: copy it." in msg
  assert _leftovers(tmp_path / "c") == []


def test_dead_first_mirror_then_second(server, tmp_path):
  body = _blob()
  server.files["/m2/f.bin"] = body
  dead = _closed_port_url()
  urls = [dead + "f.bin", server.url + "/missing/f.bin", server.url + "/m2/f.bin"]
  dest = download.fetch(urls, tmp_path / "f.bin", sha256=hashlib.sha256(body).hexdigest())
  assert dest.read_bytes() == body
  assert server.hits == ["/missing/f.bin", "/m2/f.bin"]
  # All dead: one line naming every URL with its reason.
  with pytest.raises(download.DownloadError) as err:
    download.fetch(urls[:2], tmp_path / "g.bin", sha256="0" * 64)
  msg = _one_line(err)
  assert urls[0] in msg and "refused" in msg.lower() and urls[1] in msg and "HTTP 404" in msg


@pytest.mark.parametrize("sha", [True, False])
def test_interrupted_transfer_leaves_nothing(server, tmp_path, sha):
  body = _blob()
  server.files["/f.bin"] = body
  server.cut["/f.bin"] = 30_000  # headers announce 100,000 bytes, then the server hangs up
  with pytest.raises(download.DownloadError) as err:
    download.fetch([server.url + "/f.bin"], tmp_path / "f.bin",
                   sha256=hashlib.sha256(body).hexdigest() if sha else None)
  assert "30000 of 100000 bytes" in _one_line(err)
  assert _leftovers(tmp_path) == []


def test_silent_server_times_out(tmp_path):
  with socket.socket() as listener:  # accepts connections (backlog) but never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/f.bin"
    start = time.monotonic()
    with pytest.raises(download.DownloadError, match="no answer within 0.3 s"):
      download.fetch([url], tmp_path / "f.bin", timeout=0.3)
    assert time.monotonic() - start < 10
  assert _leftovers(tmp_path) == []


def test_validate_rejects_and_unwritable_folder_is_one_line(server, tmp_path):
  server.files["/f.bin"] = b"abc"

  def validate(path):
    raise ValueError(f"{path.read_bytes()!r} is not a table")

  with pytest.raises(download.DownloadError, match="b'abc' is not a table"):
    download.fetch([server.url + "/f.bin"], tmp_path / "f.bin", validate=validate)
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="cannot create the data folder"):
    download.fetch([server.url + "/f.bin"], tmp_path / "file" / "sub" / "f.bin")


# ------------------------------------------------------------------ MNIST


def _serve_mnist(server, prefix="/mnist", flip=None):
  for name in mnist.FILES:
    body = bytearray((SHARED_MNIST / name).read_bytes())
    if name == flip:
      body[len(body) // 2] ^= 0x01
    server.files[f"{prefix}/{name}"] = bytes(body)


@needs_mnist
def test_mnist_downloads_verifies_caches(server, monkeypatch, fresh_machine):
  _serve_mnist(server)
  monkeypatch.setenv(mnist.URL_ENV, f"{_closed_port_url()} {server.url}/mnist")
  x_tr, y_tr, x_te, y_te = mnist.load_mnist()
  assert sorted(server.hits) == sorted(f"/mnist/{n}" for n in mnist.FILES)
  assert _leftovers(fresh_machine) == sorted(mnist.FILES)
  for name in mnist.FILES:
    assert (fresh_machine / "mnist" / name).read_bytes() == (SHARED_MNIST / name).read_bytes()
  assert x_tr.shape == (60000, 28, 28, 1) and y_te.shape == (10000,)
  assert np.bincount(y_tr)[:3].tolist() == [5923, 6742, 5958]
  # Cached: a second load asks nobody.
  mnist.load_mnist()
  assert len(server.hits) == 4


@needs_mnist
def test_mnist_corrupt_download_is_one_line_and_not_cached(server, monkeypatch, fresh_machine):
  _serve_mnist(server, flip=mnist.TRAIN_LABELS)
  monkeypatch.setenv(mnist.URL_ENV, f"{server.url}/mnist/")
  with pytest.raises(download.DownloadError) as err:
    mnist.load_mnist()
  msg = _one_line(err)
  assert f"{server.url}/mnist/{mnist.TRAIN_LABELS}" in msg and "SHA-256" in msg
  assert f"into {fresh_machine / 'mnist'}" in msg and mnist.URL_ENV in msg
  assert _leftovers(fresh_machine) == [mnist.TRAIN_IMAGES]  # fetched before the bad one
  # A folder named explicitly is never downloaded into.
  with pytest.raises(FileNotFoundError, match="Looked in"):
    mnist.load_mnist(fresh_machine.parent)
  assert len(server.hits) == 2


@needs_mnist
def test_mnist_env_data_root_is_where_downloads_go(server, monkeypatch, tmp_path):
  _serve_mnist(server)
  monkeypatch.setenv(mnist.URL_ENV, f"{server.url}/mnist")
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "root"))
  (tmp_path / "root" / "mnist").mkdir(parents=True)  # a partial copy is completed
  shutil.copy(SHARED_MNIST / mnist.TEST_LABELS, tmp_path / "root" / "mnist")
  mnist.fetch_mnist()
  assert sorted(server.hits) == sorted(f"/mnist/{n}" for n in mnist.FILES if n != mnist.TEST_LABELS)
  assert _leftovers(tmp_path / "root") == sorted(mnist.FILES)


@needs_mnist
@pytest.mark.slow
def test_mnist_cli_on_a_fresh_clone(server, tmp_path):
  """experiments/mnist.py in a copy of the checkout with no shared/ beside it."""
  _serve_mnist(server)
  clone = tmp_path / "clone"
  listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")
  for rel in filter(None, listed):
    if (REPO / rel).is_file():
      (clone / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(REPO / rel, clone / rel)
  home = tmp_path / "home"
  env = {k: v for k, v in os.environ.items()
         if k not in (paths.ENV_VAR, "XDG_CACHE_HOME") and "proxy" not in k.lower()}
  # PYTHONPATH: the clone's package, not the editable install of this checkout.
  env.update(HOME=str(home), no_proxy="127.0.0.1", JAX_PLATFORMS="cpu", PYTHONPATH=str(clone),
             **{mnist.URL_ENV: f"{server.url}/mnist"})
  proc = subprocess.run(
      [sys.executable, "experiments/mnist.py", "--preset", "cpu", "--N", "2", "--global-iters",
       "1", "--test-size", "50", "--out", str(tmp_path / "out")],
      cwd=clone, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert len(server.hits) == 4
  assert _leftovers(home / ".cache" / "ensemble_fl") == sorted(mnist.FILES)
  assert json.loads((tmp_path / "out" / "results.json").read_text())
  assert "MB/s" in proc.stderr or "kB/s" in proc.stderr


# ------------------------------------------------------------------ UCI HAR


def _uci_arrays(n_train=8, n_test=6, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n, subjects in (("train", n_train, [1, 3, 5]), ("test", n_test, [2, 4])):
    arrays[f"x_{split}"] = rng.uniform(-1, 1, size=(n, 561)).astype(np.float32)
    arrays[f"y_{split}"] = rng.integers(1, 7, size=n).astype(np.int8)
    arrays[f"subject_{split}"] = np.resize(subjects, n).astype(np.int8)
  return arrays


def _uci_zip(arrays, nested=True) -> bytes:
  """An archive of UCI's layout: outer zip > 'UCI HAR Dataset.zip' > folder of text files."""
  inner = io.BytesIO()
  with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as z:
    for split in ("train", "test"):
      for kind, fmt in (("X", "%.8e"), ("y", "%d"), ("subject", "%d")):
        text = io.StringIO()
        np.savetxt(text, arrays[f"{kind.lower()}_{split}"], fmt=fmt)
        z.writestr(f"UCI HAR Dataset/{split}/{kind}_{split}.txt", text.getvalue())
        z.writestr(f"__MACOSX/UCI HAR Dataset/{split}/._{kind}_{split}.txt", b"\x00junk")
    z.writestr("UCI HAR Dataset/features.txt", "1 tBodyAcc-mean()-X\n")
  if not nested:
    return inner.getvalue()
  outer = io.BytesIO()
  with zipfile.ZipFile(outer, "w") as z:
    z.writestr("UCI HAR Dataset.zip", inner.getvalue())
    z.writestr("UCI HAR Dataset.names", "names\n")
  return outer.getvalue()


SMALL = har.UciExpected(n_train=8, n_test=6, labels_sha256=None)


@pytest.mark.parametrize("nested", [True, False])
def test_uci_download_converts_and_records(server, fresh_machine, nested):
  arrays = _uci_arrays()
  body = _uci_zip(arrays, nested)
  server.files["/uci.zip"] = body
  npz = har.fetch_uci_har(mirrors=[_closed_port_url(), server.url + "/uci.zip"],
                          archive_sha256=[hashlib.sha256(body).hexdigest()], expected=SMALL)
  assert npz == fresh_machine / "har" / har.UCI_NPZ
  assert _leftovers(fresh_machine) == [har.UCI_DIGESTS, har.UCI_NPZ]  # the archive is gone
  recorded = json.loads((fresh_machine / "har" / har.UCI_DIGESTS).read_text())["sha256"]
  assert recorded["x_train"] == hashlib.sha256(arrays["x_train"].tobytes()).hexdigest()
  x, y, user, origin = har.get_uci_har(expected=SMALL)
  assert origin == str(npz) and server.hits == ["/uci.zip"]
  np.testing.assert_array_equal(x, np.concatenate([arrays["x_train"], arrays["x_test"]]))
  np.testing.assert_array_equal(y, np.concatenate([arrays["y_train"], arrays["y_test"]]) - 1)
  np.testing.assert_array_equal(user, np.concatenate([arrays["subject_train"],
                                                      arrays["subject_test"]]))


def test_uci_bad_archives_are_refused(server, fresh_machine):
  body = _uci_zip(_uci_arrays())
  server.files["/uci.zip"] = body
  digest = hashlib.sha256(body).hexdigest()
  cases = [  # (archive digest accepted, expected structure, reason fragment)
      ("0" * 64, SMALL, "is not the published file's"),
      (digest, har.UCI_EXPECTED, "UCI HAR has 7352 rows x 561 features"),
      (digest, SMALL._replace(labels_sha256="0" * 64), "differ from UCI HAR's"),
  ]
  for accepted, expected, fragment in cases:
    with pytest.raises(download.DownloadError) as err:
      har.fetch_uci_har(mirrors=[server.url + "/uci.zip"], archive_sha256=accepted,
                        expected=expected)
    assert fragment in _one_line(err) and har.UCI_URL_ENV in str(err.value)
    assert _leftovers(fresh_machine) == []
  server.files["/uci.zip"] = body[:len(body) // 2]  # complete transfer of a broken zip
  with pytest.raises(download.DownloadError, match="not a readable zip archive"):
    har.fetch_uci_har(mirrors=[server.url + "/uci.zip"], archive_sha256=(), expected=SMALL)


def test_uci_recorded_digest_catches_a_changed_npz(server, fresh_machine):
  body = _uci_zip(_uci_arrays())
  server.files["/uci.zip"] = body
  npz = har.fetch_uci_har(mirrors=[server.url + "/uci.zip"],
                          archive_sha256=hashlib.sha256(body).hexdigest(), expected=SMALL)
  with np.load(npz) as f:
    arrays = dict(f)
  arrays["x_train"][0, 0] += 1
  np.savez(npz, **arrays)
  with pytest.raises(ValueError, match="x_train differ from the SHA-256 recorded") as err:
    har.get_uci_har(expected=SMALL)
  assert "Delete uci_har.npz and uci_har.json" in _one_line(err)


def test_uci_preseeded_archive_needs_no_network(monkeypatch, fresh_machine):
  body = _uci_zip(_uci_arrays(), nested=False)
  (fresh_machine / "har").mkdir(parents=True)
  (fresh_machine / "har" / "UCI HAR Dataset.zip").write_bytes(body)
  with pytest.raises(ValueError, match="is not that of UCI's archive"):
    har.get_uci_har(expected=SMALL)
  monkeypatch.setattr(har, "UCI_ARCHIVE_SHA256", (hashlib.sha256(body).hexdigest(),))
  x, _, _, origin = har.get_uci_har(expected=SMALL)
  assert x.shape == (14, 561) and origin.endswith("UCI HAR Dataset.zip")
  assert (fresh_machine / "har" / har.UCI_NPZ).is_file()  # converted next to it
  assert har.get_uci_har(expected=SMALL)[3].endswith(har.UCI_NPZ)


def test_uci_missing_and_offline_is_one_line(fresh_machine, tmp_path):
  with pytest.raises(download.DownloadError) as err:  # the autouse fixture's dead URL
    har.get_uci_har()
  msg = _one_line(err)
  assert "uci.zip" in msg and "Offline: copy UCI's archive" in msg and "source 'hapt'" in msg
  with pytest.raises(FileNotFoundError, match="no UCI HAR data"):
    har.get_uci_har(tmp_path)  # a named folder: looked in, never downloaded into


def test_har_federated_uci_end_to_end_and_auto(server, monkeypatch, fresh_machine, tmp_path):
  arrays = _uci_arrays(n_train=40, n_test=20)
  body = _uci_zip(arrays)
  server.files["/uci.zip"] = body
  monkeypatch.setenv(har.UCI_URL_ENV, server.url + "/uci.zip")
  monkeypatch.setattr(har, "UCI_ARCHIVE_SHA256", (hashlib.sha256(body).hexdigest(),))
  monkeypatch.setattr(har, "UCI_EXPECTED", SMALL._replace(n_train=40, n_test=20))
  # Nothing on disk: "auto" picks the downloadable UCI HAR, without asking the network.
  assert har.resolve_source() == "uci" and server.hits == []
  hapt_root = tmp_path / "hapt_root"
  (hapt_root / "hapt").mkdir(parents=True)
  (hapt_root / "hapt" / har.HAPT_FILE).write_bytes(b"")
  assert har.resolve_source(hapt_root) == "hapt"
  assert har.resolve_source(tmp_path / "empty") == "hapt"
  assert har.resolve_source(None, "hapt") == "hapt" and har.resolve_source(None, "uci") == "uci"
  data = har.har_federated("uci", seed=0)
  assert server.hits == ["/uci.zip"]
  assert data.info["source"] == "uci" and data.info["feature_dim"] == 561
  assert data.info["origin"] == str(fresh_machine / "har" / har.UCI_NPZ)
  np.testing.assert_array_equal(data.info["user_ids"], [1, 2, 3, 4, 5])
  counts = np.bincount(data.test_client, minlength=5) + data.clients.sizes
  users = np.concatenate([arrays["subject_train"], arrays["subject_test"]])
  np.testing.assert_array_equal(counts, [np.sum(users == u) for u in [1, 2, 3, 4, 5]])
  for i in range(5):  # the paper's split: 75 / 25 per user over the pooled examples
    assert abs(data.clients.sizes[i] - 0.75 * counts[i]) <= 1
  # Now on disk: "auto" uses it, and still never asks the network.
  assert har.resolve_source() == "uci"
  assert har.har_federated("auto", seed=0).info["source"] == "uci" and len(server.hits) == 1


def test_real_uci_labels_digest_matches_shared_labels():
  """The pinned label/subject digest is that of the published y and subject files."""
  npz = SHARED / "har" / "har_labels_subjects.npz"
  if not npz.is_file():
    pytest.skip(f"{npz} not found")
  with np.load(npz) as f:
    arrays = {k: f[k] for k in ("y_train", "y_test", "subject_train", "subject_test")}
  arrays["x_train"] = np.zeros((7352, 561), np.float32)
  arrays["x_test"] = np.zeros((2947, 561), np.float32)
  har.check_uci_har(arrays, "real labels")
  arrays["y_test"] = arrays["y_test"].copy()
  arrays["y_test"][[0, 1]] = arrays["y_test"][[1, 0]] % 6 + 1
  with pytest.raises(ValueError, match="differ from UCI HAR's"):
    har.check_uci_har(arrays, "permuted labels")
  arrays["subject_test"] = arrays["subject_test"].copy()
  arrays["subject_test"][0] = 1  # subject 1 is a training subject
  with pytest.raises(ValueError, match=r"subjects \[1\] are in both"):
    har.check_uci_har(arrays, "leaky split")


@pytest.mark.parametrize("outcome", ["verified", "refused"])
def test_partial_files_of_a_killed_download_are_removed_next_time(server, tmp_path, outcome):
  body = _blob()
  server.files["/f.bin"] = body
  folder = tmp_path / "c"
  folder.mkdir()
  stale = [folder / ".f.bin.k1ll3d_x.part", folder / ".f.bin.abcdefgh.part"]
  kept = [folder / ".g.bin.abcdefgh.part",   # another file's partial download
          folder / "f.bin.part",              # not a name fetch gives
          folder / ".f.bin.abcdefgh.part.bak", folder / "notes.txt"]
  live = folder / ".f.bin.l1vel1ve.part"      # a download still running holds its lock
  for path in stale + kept + [live]:
    path.write_bytes(b"partial")
  holder = os.open(live, os.O_RDONLY)
  fcntl.flock(holder, fcntl.LOCK_EX)
  try:
    digest = hashlib.sha256(body if outcome == "verified" else b"other").hexdigest()
    try:
      download.fetch([server.url + "/f.bin"], folder / "f.bin", sha256=digest)
    except download.DownloadError:
      assert outcome == "refused"
  finally:
    os.close(holder)
  want = sorted([p.name for p in kept + [live]] + (["f.bin"] if outcome == "verified" else []))
  assert _leftovers(folder) == want
