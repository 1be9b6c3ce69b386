"""The deployable ensemble: save, load, certify new inputs, remove clients.

Library tests use the tiny MLP (a user's own model, loaded with its
functions) and a small registered HarMLP; the command-line tests run the
MNIST script at tiny size in this process, then ``python -m ensemble_fl``.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import ensemble_fl as efl
from ensemble_fl import certify, cli, deploy, models
from ensemble_fl.clients import ClientData
from ensemble_fl.data import paths
from tiny_model import CONFIG, NUM_CLASSES, NUM_FEATURES, apply_fn, init_fn, make_clients

REPO = Path(__file__).resolve().parents[1]
DATA = paths.default_data_dir()
needs_mnist = pytest.mark.skipif(
    DATA is None or not (DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file(),
    reason="MNIST files not in the data root")

SPEC = deploy.ModelSpec("TinyMLP", {}, (NUM_FEATURES,), NUM_CLASSES)
PLANS = {
    "exact": dict(mode="exact", n=6, k=2),
    "monte_carlo": dict(mode="monte_carlo", n=6, k=2, num_models=9),
    "partition": dict(mode="partition", n=6, num_models=3),
    "replicated": dict(mode="partition", n=6, num_models=6, replicas=2),
    "cyclic": dict(mode="cyclic", n=6, num_models=5, replicas=2),
}


def leaves(params):
  return jax.tree_util.tree_leaves(params)


@pytest.fixture(scope="module")
def trained():
  """``{plan name: Ensemble}`` of the tiny model on the tiny clients."""
  clients = make_clients()
  out = {}
  for name, kw in PLANS.items():
    plan = efl.make_plan(seed=3, **kw)
    params = efl.train_ensemble(init_fn, apply_fn, clients, plan, CONFIG)
    out[name] = deploy.make_ensemble(params, plan, SPEC, CONFIG, apply_fn=apply_fn,
                                     init_fn=init_fn, plan_seed=3, clients=clients,
                                     metadata={"note": name})
  return out


def inputs(d=11, seed=0):
  return np.random.default_rng(seed).normal(size=(d, NUM_FEATURES)).astype(np.float32)


# ---------------------------------------------------------------------------
# Save and load.


@pytest.mark.parametrize("name", list(PLANS))
def test_a_reloaded_ensemble_is_the_saved_one_and_certifies_alike(trained, name, tmp_path):
  ens = trained[name]
  path = ens.save(tmp_path / "ens")
  assert sorted(os.listdir(tmp_path)) == ["ens"]  # no staging folder left behind
  back = deploy.load_ensemble(path, apply_fn=apply_fn, init_fn=init_fn)
  for a, b in zip(leaves(ens.params), leaves(back.params)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  for field in ("subsets", "keys", "root_key"):
    assert np.array_equal(getattr(ens.plan, field), getattr(back.plan, field))
  assert (back.plan.mode, back.plan.n, back.plan.k, back.plan.replicas) == \
      (ens.plan.mode, ens.plan.n, ens.plan.k, ens.plan.replicas)
  assert back.config == ens.config and back.plan_seed == 3 and back.metadata == {"note": name}
  assert np.array_equal(back.digests, ens.digests)
  x = inputs()
  for mode in ens.certificate_modes:
    a, b = ens.certify_inputs(x, mode=mode), back.certify_inputs(x, mode=mode)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.levels, b.levels)
    assert a.guarantee == b.guarantee


@pytest.mark.parametrize("name, modes", [
    ("exact", ("exact", "deterministic", "runoff")),
    ("monte_carlo", ("deterministic", "monte_carlo", "runoff")),
    ("partition", ("deterministic", "partition", "runoff")),
    ("replicated", ("deterministic", "runoff")),
])
def test_each_plan_offers_the_certificates_that_hold_for_it(trained, name, modes):
  ens = trained[name]
  assert ens.certificate_modes == modes
  x = inputs()
  logits = np.stack([apply_fn(jax.tree_util.tree_map(lambda l, i=i: l[i], ens.params), x)
                     for i in range(ens.num_models)])
  votes = np.argmax(logits, axis=-1)
  ranks = np.argsort(-logits, axis=-1, kind="stable")
  assert np.array_equal(ens.predict(x), votes)  # against a plain per-model loop
  assert np.array_equal(ens.predict_rankings(x), ranks)
  plan = ens.plan
  direct = {"exact": dict(n=6, k=2), "monte_carlo": dict(n=6, k=2, alpha=0.001),
            "partition": {}, "deterministic": dict(n=6, subsets=plan.subsets),
            "runoff": dict(n=6, subsets=plan.subsets, rankings=ranks)}
  for mode in modes:
    want = certify.certify(votes, num_classes=NUM_CLASSES, mode=mode, **direct[mode])
    got = ens.certify_inputs(x, mode=mode)
    assert np.array_equal(got.levels, want.levels) and np.array_equal(got.labels, want.labels)
  assert ens.certify_inputs(x).mode == modes[0]
  other = {"exact", "deterministic", "partition", "monte_carlo"} - set(modes)
  for mode in other:
    with pytest.raises(ValueError, match="does not apply"):
      ens.certify_inputs(x, mode=mode)


def test_a_registered_model_loads_without_its_functions(tmp_path):
  clients = make_clients()
  module = models.HarMLP(num_classes=NUM_CLASSES, hidden=(5,))
  spec = deploy.ModelSpec.of(module, (NUM_FEATURES,))
  assert spec.kwargs["hidden"] == [5] and spec.num_classes == NUM_CLASSES
  plan = efl.make_plan("partition", n=6, num_models=2, seed=0)
  dummy = np.zeros((1, NUM_FEATURES), np.float32)
  params = efl.train_ensemble(lambda k: module.init(k, dummy), module.apply, clients, plan, CONFIG)
  ens = deploy.make_ensemble(params, plan, spec, CONFIG, plan_seed=0)
  back = deploy.load_ensemble(ens.save(tmp_path / "e"))
  assert back.model == spec
  x = inputs()
  assert np.array_equal(back.predict(x), ens.predict(x))
  with pytest.raises(ValueError, match="not one of ensemble_fl's"):
    deploy.load_ensemble(deploy.save_ensemble(tmp_path / "t", params, plan, SPEC, CONFIG,
                                              apply_fn=module.apply))


def test_a_secret_plan_keeps_no_seed_and_a_private_folder(trained, tmp_path):
  import dataclasses
  ens = dataclasses.replace(trained["partition"], plan_seed=None)
  path = ens.save(tmp_path / "secret")
  manifest = json.loads((path / deploy.MANIFEST).read_text())
  assert manifest["plan"]["seed"] is None and manifest["plan"]["secret"] is True
  assert (path.stat().st_mode & 0o077) == 0
  public = trained["partition"].save(tmp_path / "public")
  assert json.loads((public / deploy.MANIFEST).read_text())["plan"]["seed"] == 3


def test_saving_never_replaces_files_unless_told(trained, tmp_path):
  ens = trained["partition"]
  target = tmp_path / "e"
  target.mkdir()
  (target / "mine.txt").write_text("keep")
  with pytest.raises(ValueError, match="already holds files"):
    ens.save(target)
  assert (target / "mine.txt").read_text() == "keep"
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    ens.save(tmp_path / "file")
  ens.save(target, overwrite=True)
  assert sorted(os.listdir(target)) == sorted([deploy.MANIFEST, deploy.PARAMS_FILE,
                                               deploy.PLAN_FILE])
  assert sorted(os.listdir(tmp_path)) == ["e", "file"]


# ---------------------------------------------------------------------------
# Bad folders, tampered files, mismatched models.


def _flip_byte(path, offset=-100):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0xFF
  path.write_bytes(bytes(data))


def _tamper_params(path):
  _flip_byte(path / deploy.PARAMS_FILE)


def _tamper_manifest(path):
  manifest = json.loads((path / deploy.MANIFEST).read_text())
  manifest["fedavg"]["lr"] = 0.5
  (path / deploy.MANIFEST).write_text(json.dumps(manifest))


def _forge_keys(path):
  # A consistent forgery of the digests, keys that do not follow from the subsets.
  with np.load(path / deploy.PLAN_FILE) as f:
    arrays = {k: f[k] for k in f.files}
  arrays["keys"] = arrays["keys"][::-1].copy()
  np.savez(path / deploy.PLAN_FILE, **arrays)
  manifest = json.loads((path / deploy.MANIFEST).read_text())
  manifest["files"][deploy.PLAN_FILE] = deploy._sha256(path / deploy.PLAN_FILE)
  manifest["fingerprint"] = deploy._fingerprint(manifest)
  (path / deploy.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, needle", [
    (_tamper_params, "edited or damaged"),
    (_tamper_manifest, "fingerprint does not match"),
    (lambda p: (p / deploy.PLAN_FILE).unlink(), "is missing"),
    (lambda p: (p / deploy.MANIFEST).unlink(), "not a saved ensemble"),
    (lambda p: (p / deploy.MANIFEST).write_text("{not json"), "unreadable"),
    (_forge_keys, "keys do not follow"),
])
def test_a_damaged_or_edited_ensemble_is_refused_in_one_line(trained, tmp_path, damage, needle):
  path = trained["replicated"].save(tmp_path / "e")
  damage(path)
  with pytest.raises(deploy.EnsembleFormatError, match=needle) as e:
    deploy.load_ensemble(path, apply_fn=apply_fn, init_fn=init_fn)
  assert "\n" not in str(e.value)


def test_params_of_another_model_are_refused(trained, tmp_path):
  path = trained["partition"].save(tmp_path / "e")
  other = models.HarMLP(num_classes=NUM_CLASSES, hidden=(7,))
  dummy = np.zeros((1, NUM_FEATURES), np.float32)
  with pytest.raises(ValueError, match="do not fit model"):
    deploy.load_ensemble(path, apply_fn=other.apply, init_fn=lambda k: other.init(k, dummy))
  plan = efl.make_plan("partition", n=6, num_models=4, seed=0)
  with pytest.raises(ValueError, match="params hold 3 models but the plan has 4"):
    deploy.make_ensemble(trained["partition"].params, plan, SPEC, CONFIG, apply_fn=apply_fn)


@pytest.mark.parametrize("x, needle", [
    (np.zeros((3, NUM_FEATURES), np.uint8), "floating point"),
    (np.zeros((3, NUM_FEATURES + 1), np.float32), r"must be \[d, 4\]"),
    (np.zeros((0, NUM_FEATURES), np.float32), r"must be \[d, 4\]"),
    (np.full((2, NUM_FEATURES), np.nan, np.float32), "NaN or inf"),
])
def test_inputs_of_the_wrong_shape_or_dtype_are_refused(trained, x, needle):
  with pytest.raises(ValueError, match=needle):
    trained["partition"].certify_inputs(x)


@pytest.mark.parametrize("perturb", [False, True])
def test_copies_of_a_model_predict_once_unless_their_params_differ(monkeypatch, perturb):
  # 2 replicas of 6 one-client groups: 12 rows, 6 distinct models.
  plan = efl.make_plan("partition", n=6, num_models=12, replicas=2, seed=3)
  params = efl.train_ensemble(init_fn, apply_fn, make_clients(), plan, CONFIG)
  index = efl.distinct_subsets(plan)[1]
  twin = int(np.flatnonzero(index == index[0])[1])  # row 0's copy
  if perturb:  # as if retrained elsewhere: same subset, other bits
    params = jax.tree_util.tree_map(np.array, params)
    leaves(params)[0][twin].flat[0] += 1.0
  ens = deploy.make_ensemble(params, plan, SPEC, CONFIG, apply_fn=apply_fn, init_fn=init_fn,
                             plan_seed=3)
  copies = efl.equal_models(plan, params)
  assert len(np.unique(copies)) == 6 + perturb
  assert (copies[twin] == copies[0]) == (not perturb)
  for i in range(12):  # rows share a value only when subsets and every param are equal
    for j in range(12):
      same = index[i] == index[j] and all(np.array_equal(l[i], l[j]) for l in leaves(params))
      assert (copies[i] == copies[j]) == same
  x = inputs(13)
  want = efl.predict(apply_fn, params, x)
  want_ranks = efl.predict_rankings(apply_fn, params, x)
  rows_seen = []
  real_pad = efl.ensemble._pad_rows
  monkeypatch.setattr(efl.ensemble, "_pad_rows",
                      lambda a, size: rows_seen.append(len(a)) or real_pad(a, size))
  np.testing.assert_array_equal(ens.predict(x), want)
  np.testing.assert_array_equal(ens.predict_rankings(x), want_ranks)
  assert sum(rows_seen) == 2 * (6 + perturb) * len(leaves(params))  # two calls


@pytest.mark.parametrize("name", PLANS)
def test_models_trained_together_are_copies_exactly_when_their_subsets_repeat(trained, name):
  ens = trained[name]
  count, index = efl.distinct_subsets(ens.plan)
  got = efl.equal_models(ens.plan, ens.params)
  if count == ens.num_models:
    assert got is None
  else:  # one training run copies a repeated subset's model bit for bit
    np.testing.assert_array_equal(got, index)


# ---------------------------------------------------------------------------
# Removing clients.


@pytest.mark.parametrize("name, removed", [
    ("exact", [1]), ("monte_carlo", [0, 4]), ("partition", [2]), ("replicated", [5]),
])
def test_removing_clients_retrains_only_their_models_as_training_would(trained, name, removed):
  ens = trained[name]
  clients = make_clients()
  new = deploy.remove_clients(ens, removed, clients)
  old_subsets = ens.plan.subsets
  hit = np.isin(old_subsets, removed).any(axis=1)
  assert not np.isin(new.plan.subsets, removed).any()
  assert new.removed == tuple(sorted(removed))
  # Untouched models: bit for bit the same.
  kept_rows = np.flatnonzero(~hit)
  new_rows = {tuple(r): i for i, r in enumerate(new.plan.subsets.tolist())}
  for r in kept_rows:
    j = new_rows[tuple(old_subsets[r].tolist())]
    for a, b in zip(leaves(ens.params), leaves(new.params)):
      assert np.array_equal(a[r], b[j])
  # Retrained models: what training a plan of those subsets from scratch gives.
  for r in np.flatnonzero(hit):
    sub = old_subsets[r][(old_subsets[r] >= 0) & ~np.isin(old_subsets[r], removed)]
    if sub.size == 0:
      continue
    row = np.full(old_subsets.shape[1], -1, np.int32)
    row[:sub.size] = sub
    j = [i for i, s in enumerate(new.plan.subsets.tolist()) if s == row.tolist()][0]
    alone = efl.SubsamplePlan("partition", row[None], efl.ensemble.subset_keys(
        ens.plan.root_key, row[None]), 6, None)
    fresh = efl.train_ensemble(init_fn, apply_fn, clients, alone, CONFIG)
    for a, b in zip(leaves(fresh), leaves(new.params)):
      assert np.array_equal(a[0], b[j])
  # The input ensemble is unchanged, and the new plan certifies its own models.
  assert np.array_equal(ens.plan.subsets, old_subsets)
  x = inputs()
  want = certify.certify(new.predict(x), num_classes=NUM_CLASSES, n=6, mode="deterministic",
                         subsets=new.plan.subsets)
  assert np.array_equal(new.certify_inputs(x, mode="deterministic").levels, want.levels)
  assert "exact" not in new.certificate_modes and "monte_carlo" not in new.certificate_modes
  assert "deterministic" in new.certificate_modes and "runoff" in new.certificate_modes


def test_a_model_of_removed_clients_only_is_dropped(trained, tmp_path):
  ens = trained["partition"]  # 3 groups of 2 clients
  group = ens.plan.subsets[1][ens.plan.subsets[1] >= 0].tolist()
  new = deploy.remove_clients(ens, group, make_clients())
  assert new.num_models == 2
  assert np.array_equal(new.plan.subsets, ens.plan.subsets[[0, 2]])
  for a, b in zip(leaves(ens.params), leaves(new.params)):
    assert np.array_equal(a[[0, 2]], b)
  back = deploy.load_ensemble(new.save(tmp_path / "e"), apply_fn=apply_fn, init_fn=init_fn)
  assert back.removed == tuple(sorted(group)) and back.num_models == 2
  with pytest.raises(ValueError, match="already removed"):
    deploy.remove_clients(back, group[:1], make_clients())


def test_removal_refuses_other_data_and_bad_ids(trained):
  ens = trained["replicated"]
  clients = make_clients()
  other = ClientData(clients.x.copy(), clients.y, clients.sizes)
  other.x[3, 0, 0] += 1.0
  row = ens.plan.subsets[np.isin(ens.plan.subsets, [3]).any(axis=1)][0]
  partner = int(row[(row >= 0) & (row != 3)][0])  # removing it retrains a model of client 3
  with pytest.raises(ValueError, match=r"data of clients \[3\] differs"):
    deploy.remove_clients(ens, [partner], other)
  # The removed clients' own rows may be erased: they are never read.
  erased = ClientData(clients.x.copy(), clients.y, clients.sizes)
  erased.x[0] = 0.0
  deploy.remove_clients(ens, [0], erased)
  for bad, needle in (([6], r"lie in \[0, 6\)"), ([1, 1], "twice"), ([], "one or more"),
                      (["a"], "integer")):
    with pytest.raises(ValueError, match=needle):
      deploy.remove_clients(ens, bad, clients)


# ---------------------------------------------------------------------------
# The command line: train -> certify new inputs -> certify saved votes -> remove.

MNIST_TINY = ["--global-iters", "1", "--local-iters", "2", "--batch-size", "8", "--lr", "0.05",
              "--n-clients", "20", "--k", "2", "--N", "12", "--alpha", "0.5",
              "--test-size", "60", "--no-baseline"]


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("run") / "mnist"
  assert cli.experiment_main("mnist", [*MNIST_TINY, "--rankings", "--out", str(out)]) == 0
  return out


def _csv(path):
  rows = path.read_text().splitlines()
  header = rows[0].split(",")
  return {h: np.array([int(r.split(",")[i]) for r in rows[1:]]) for i, h in enumerate(header)}


@needs_mnist
def test_a_run_saves_its_ensemble_and_the_reload_reproduces_its_certificates(mnist_run,
                                                                             tmp_path):
  saved = np.load(mnist_run / "predictions.npz")
  ens = deploy.load_ensemble(mnist_run / "ensemble")
  assert ens.num_models == 12 and ens.plan.mode == "monte_carlo" and ens.plan_seed == 0
  x_test = efl.load_mnist()[2][:60]
  np.save(tmp_path / "x.npy", x_test)
  # Every step from the command line: the run's own Monte Carlo certificate...
  out = tmp_path / "mc"
  assert cli.package_main(["certify", "--ensemble", str(mnist_run / "ensemble"), "--inputs",
                           str(tmp_path / "x.npy"), "--mode", "monte_carlo", "--alpha", "0.5",
                           "--out", str(out)]) == 0
  rows = _csv(out / "certificates.csv")
  assert np.array_equal(rows["label"], saved["labels"])
  assert np.array_equal(rows["level"], saved["levels"])
  # ... and, from its saved votes, the deployed vote's (another mode, no model run).
  out = tmp_path / "det"
  assert cli.package_main(["certify", "--predictions", str(mnist_run / "predictions.npz"),
                           "--out", str(out)]) == 0
  rows = _csv(out / "certificates.csv")
  want = certify.certify(saved["model_labels"], num_classes=10, n=20, mode="deterministic",
                         subsets=ens.plan.subsets)
  assert np.array_equal(rows["level"], want.levels)
  assert np.array_equal(rows["y_true"], saved["y_true"])
  body = json.loads((out / "certificates.json").read_text())
  assert body["mode"] == "deterministic" and body["fingerprint"] == ens.fingerprint
  assert body["certified_accuracy"]["0"] == pytest.approx(
      float(np.mean((want.labels == saved["y_true"]) & (want.levels >= 0))))
  # The file holds the whole curve, every m to the largest level + 1 (where it is 0).
  every_m = list(range(int(want.levels.max()) + 2))
  assert sorted(map(int, body["certified_accuracy"])) == every_m == sorted(
      map(int, body["certified_share"]))
  assert [body["certified_accuracy"][str(m)] for m in every_m] == pytest.approx(
      [float(np.mean((want.labels == saved["y_true"]) & (want.levels >= m))) for m in every_m])
  assert body["certified_accuracy"][str(every_m[-1])] == 0.0
  # The two-round vote needs every model's ranking: predicted from the inputs.
  out = tmp_path / "runoff"
  assert cli.package_main(["certify", "--ensemble", str(mnist_run / "ensemble"), "--inputs",
                           str(tmp_path / "x.npy"), "--mode", "runoff", "--out", str(out)]) == 0
  rows = _csv(out / "certificates.csv")
  ranks = ens.predict_rankings(x_test)
  assert np.array_equal(ranks[..., 0], saved["model_labels"])
  want = certify.certify(ranks[..., 0], num_classes=10, n=20, mode="runoff",
                         subsets=ens.plan.subsets, rankings=ranks)
  assert np.array_equal(rows["level"], want.levels) and np.array_equal(rows["label"],
                                                                        want.labels)
  assert json.loads((out / "certificates.json").read_text())["mode"] == "runoff"
  # The run saved the same ballots (--rankings): certified from them, no model run.
  assert np.array_equal(saved["model_rankings"], ranks)
  out2 = tmp_path / "runoff-saved"
  assert cli.package_main(["certify", "--predictions", str(mnist_run / "predictions.npz"),
                           "--mode", "runoff", "--out", str(out2)]) == 0
  saved_rows = _csv(out2 / "certificates.csv")  # this one also has the run's y_true
  assert all(np.array_equal(saved_rows[c], rows[c]) for c in ("input", "label", "level"))
  assert np.array_equal(saved_rows["y_true"], saved["y_true"])
  # Its vote accuracy is the two-round winner's; round 1's plurality is reported beside it.
  body = json.loads((out2 / "certificates.json").read_text())
  assert body["vote_accuracy"] == pytest.approx(float(np.mean(want.labels == saved["y_true"])))
  assert body["plurality_accuracy"] == pytest.approx(
      float(np.mean(want.top_labels == saved["y_true"])))


@needs_mnist
def test_removing_a_client_from_the_command_line(mnist_run, tmp_path):
  ens = deploy.load_ensemble(mnist_run / "ensemble")
  client = int(ens.plan.subsets[0, 0])
  out = tmp_path / "without"
  assert cli.package_main(["remove", "--ensemble", str(mnist_run / "ensemble"), "--clients",
                           str(client), "--out", str(out)]) == 0
  new = deploy.load_ensemble(out)
  assert new.removed == (client,) and not np.isin(new.plan.subsets, [client]).any()
  hit = np.isin(ens.plan.subsets, [client]).any(axis=1)
  for a, b in zip(leaves(ens.params), leaves(new.params)):
    assert np.array_equal(a[~hit], b[~hit]) and not np.array_equal(a[hit], b[hit])
  assert new.certificate_modes == ("deterministic", "runoff")


@needs_mnist
@pytest.mark.parametrize("argv, needle", [
    (["certify", "--ensemble", "{run}", "--inputs", "{x}"], "not a saved ensemble"),
    (["certify", "--ensemble", "{ens}", "--inputs", "{bad}"], "floating point"),
    (["certify", "--ensemble", "{ens}", "--inputs", "{x}", "--mode", "exact"], "does not apply"),
    (["certify", "--ensemble", "{ens}", "--inputs", "{x}", "--alpha", "0.1"], "monte_carlo only"),
    (["certify", "--ensemble", "{ens}", "--inputs", "{missing}"], "cannot read"),
    (["certify", "--predictions", "{plain}", "--ensemble", "{ens}", "--mode", "runoff"],
     "holds no 'model_rankings'.*--rankings"),
    (["remove", "--ensemble", "{ens}", "--clients", "99", "--out", "{out}"], r"\[0, 20\)"),
    (["remove", "--ensemble", "{ens}", "--clients", "1", "--out", "{run}"], "already holds"),
    (["frobnicate"], "usage"),
])
def test_bad_command_lines_get_one_line_and_exit_2(mnist_run, tmp_path, capsys, argv, needle):
  np.save(tmp_path / "x.npy", np.zeros((2, 28, 28, 1), np.float32))
  np.save(tmp_path / "bad.npy", np.zeros((2, 28, 28, 1), np.uint8))
  with np.load(mnist_run / "predictions.npz") as saved:  # a run without --rankings
    np.savez(tmp_path / "plain.npz", **{k: saved[k] for k in saved.files
                                        if k != "model_rankings"})
  names = {"run": mnist_run, "ens": mnist_run / "ensemble", "x": tmp_path / "x.npy",
           "plain": tmp_path / "plain.npz",
           "bad": tmp_path / "bad.npy", "missing": tmp_path / "nope.npy",
           "out": tmp_path / "out"}
  argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
  assert cli.package_main(argv) == cli.EXIT_REFUSED
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and re.search(needle, err), err
  assert not (tmp_path / "out").exists()


def test_python_dash_m_runs_the_package_command():
  proc = subprocess.run([sys.executable, "-m", "ensemble_fl", "certify", "--help"],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0 and "--ensemble" in proc.stdout
