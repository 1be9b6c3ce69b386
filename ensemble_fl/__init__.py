"""ensemble_fl: ensemble federated learning, provably secure against malicious clients."""

__version__ = "0.1.0"
