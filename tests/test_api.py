"""The public API in ensemble_fl/__init__.py: every exported name resolves to
the object its module defines, and importing the package stays light."""

import importlib
import subprocess
import sys
import types

import pytest

import ensemble_fl


@pytest.mark.parametrize("name", ensemble_fl.__all__)
def test_every_public_name_resolves_to_its_definition(name):
  value = getattr(ensemble_fl, name)
  if isinstance(value, types.ModuleType):
    assert value is importlib.import_module(f"ensemble_fl.{name}")
  else:
    assert value.__module__.startswith("ensemble_fl.")
    assert value is getattr(importlib.import_module(value.__module__), name)
  assert name in dir(ensemble_fl)
  namespace = {}
  exec(f"from ensemble_fl import {name}", namespace)  # the form users write
  assert namespace[name] is value


def test_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'train'"):
    ensemble_fl.train  # pylint: disable=pointless-statement


@pytest.mark.parametrize("module", ["ensemble_fl", "ensemble_fl.certify", "ensemble_fl.data"])
def test_import_does_not_load_jax(module):
  code = f"import sys, {module}; sys.exit(3 if 'jax' in sys.modules else 0)"
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0
