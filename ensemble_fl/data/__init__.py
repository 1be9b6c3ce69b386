"""Offline data sets: MNIST (original IDX files) and HAR (UCI HAR / HAPT windows)."""

from ensemble_fl.data.har import (HarData, har_federated, load_hapt, load_uci_har,
                                  split_per_user, window_signals)
from ensemble_fl.data.mnist import assign_mnist_clients, load_mnist, split_mnist_clients
from ensemble_fl.data.paths import default_data_dir, resolve_dir

__all__ = [
    "HarData", "har_federated", "load_hapt", "load_uci_har", "split_per_user",
    "window_signals", "assign_mnist_clients", "load_mnist", "split_mnist_clients",
    "default_data_dir", "resolve_dir",
]
