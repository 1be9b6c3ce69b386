"""ensemble_fl: ensemble federated learning, provably secure against malicious clients.

The public API, enough for the README's library example::

  import ensemble_fl as efl

  x, y, x_test, y_test = efl.load_mnist()
  clients = efl.split_mnist_clients(x, y, n_clients=1000, q=0.5)
  model = efl.MnistCNN()
  plan = efl.make_plan("monte_carlo", n=1000, k=10, num_models=500, seed=0)
  config = efl.FedAvgConfig(global_iters=3000, local_iters=5, lr=0.001, batch_size=32)
  params = efl.train_ensemble(lambda key: model.init(key, x[:1]), model.apply,
                              clients, plan, config)
  votes = efl.predict(model.apply, params, x_test)          # int32 [N, d]
  cert = efl.certify.certify(votes, num_classes=10, n=1000, k=10, alpha=0.001)
  print(efl.certified_accuracy(cert, y_test, [0, 10, 20, 40]))

``efl.certify`` and ``efl.fedavg`` are the modules, whose main functions are
``certify.certify`` and ``fedavg.fedavg``: a package attribute cannot be both
a submodule and a function, since importing the submodule rebinds the name.

Every name is imported on first use (PEP 562), so ``import ensemble_fl`` and
light modules such as ``ensemble_fl.certify`` do not pull in JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "make_plan": "ensemble_fl.ensemble",
    "distinct_subsets": "ensemble_fl.ensemble",
    "equal_models": "ensemble_fl.ensemble",
    "SubsamplePlan": "ensemble_fl.ensemble",
    "train_ensemble": "ensemble_fl.ensemble",
    "predict": "ensemble_fl.ensemble",
    "predict_rankings": "ensemble_fl.ensemble",
    "predict_with_rankings": "ensemble_fl.ensemble",
    "certified_accuracy": "ensemble_fl.certify",
    "Certificate": "ensemble_fl.certify",
    "FedAvgConfig": "ensemble_fl.fedavg",
    "ClientData": "ensemble_fl.clients",
    "pack_clients": "ensemble_fl.clients",
    "MnistCNN": "ensemble_fl.models",
    "HarMLP": "ensemble_fl.models",
    "load_mnist": "ensemble_fl.data.mnist",
    "split_mnist_clients": "ensemble_fl.data.mnist",
    "har_federated": "ensemble_fl.data.har",
    "Ensemble": "ensemble_fl.deploy",
    "ModelSpec": "ensemble_fl.deploy",
    "make_ensemble": "ensemble_fl.deploy",
    "save_ensemble": "ensemble_fl.deploy",
    "load_ensemble": "ensemble_fl.deploy",
    "remove_clients": "ensemble_fl.deploy",
}
# Submodules reachable as attributes without an explicit import.
_SUBMODULES = ("certify", "fedavg", "ensemble", "models", "data", "attacks", "aggregators",
               "deploy")

__all__ = sorted(_EXPORTS) + ["certify", "fedavg"]


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value  # later look-ups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
