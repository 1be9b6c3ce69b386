"""Fixtures shared by the test modules that train the tiny model."""

import pytest

from tiny_model import make_clients


@pytest.fixture(scope="session")
def clients():
  """The tiny clients of ``tiny_model.make_clients()`` (a module may define its own)."""
  return make_clients()
