"""The tiny model and clients that the ensemble and attack tests share.

Any Flax model works with the trainer; this one compiles in a second. One
``apply_fn`` object for every test module, so jit caches hit across them.
"""

import flax.linen as nn
import numpy as np

from ensemble_fl.clients import pack_clients
from ensemble_fl.fedavg import FedAvgConfig

NUM_FEATURES, NUM_CLASSES = 4, 3
SIZES = [3, 5, 8, 4, 6, 2]


class TinyMLP(nn.Module):
  """4 features -> 5 hidden (ReLU) -> 3 logits."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_CLASSES)(nn.relu(nn.Dense(5)(x)))


MODEL = TinyMLP()
apply_fn = MODEL.apply


# The FedAvg settings of the ensemble and validation tests: one compiled program for both.
CONFIG = FedAvgConfig(global_iters=3, local_iters=2, lr=0.3, batch_size=4)


def init_fn(key):
  return MODEL.init(key, np.zeros((1, NUM_FEATURES), np.float32))


def make_clients(seed=0, sizes=SIZES):
  """Gaussian features and uniform labels, ``sizes[i]`` examples for client i."""
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(m, NUM_FEATURES)).astype(np.float32) for m in sizes]
  ys = [rng.integers(0, NUM_CLASSES, size=m) for m in sizes]
  return pack_clients(xs, ys)
