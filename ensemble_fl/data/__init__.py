"""Data sets: MNIST (original IDX files) and HAR (UCI HAR features / HAPT windows).

Files are looked up in the data roots (``paths``) and, where missing,
downloaded once into the cache with verification (``download``).
"""

from ensemble_fl.data.download import DownloadError
from ensemble_fl.data.har import (HarData, fetch_uci_har, get_uci_har, har_federated,
                                  load_hapt, load_uci_har, resolve_source, split_per_user,
                                  window_signals)
from ensemble_fl.data.mnist import (assign_mnist_clients, fetch_mnist, load_mnist,
                                    split_mnist_clients)
from ensemble_fl.data.paths import cache_dir, check_data_dir, default_data_dir, resolve_dir

__all__ = [
    "DownloadError", "HarData", "fetch_uci_har", "get_uci_har", "har_federated", "load_hapt",
    "load_uci_har", "resolve_source", "split_per_user", "window_signals",
    "assign_mnist_clients", "fetch_mnist", "load_mnist", "split_mnist_clients",
    "cache_dir", "check_data_dir", "default_data_dir", "resolve_dir",
]
