"""Tests of ensemble_fl.models: sizes, shapes, conv implementations, vmap."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ensemble_fl import models
from ensemble_fl.models import HarMLP, MnistCNN, conv_params_to_patches, num_params

X_MNIST = np.asarray(jax.random.uniform(jax.random.key(7), (3, 28, 28, 1), jnp.float32))


def _stack(trees):
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def _init_lax(key=0):
  model = MnistCNN(conv_impl="lax")
  return model, model.init(jax.random.key(key), X_MNIST)


def test_mnist_cnn_parameter_count_matches_standard_conv_net():
  expected = (5 * 5 * 1 * 20 + 20) + (5 * 5 * 20 * 50 + 50) + (800 * 512 + 512) + (512 * 10 + 10)
  for impl in models.CONV_IMPLS:
    params = jax.eval_shape(MnistCNN(conv_impl=impl).init, jax.random.key(0), X_MNIST)
    assert num_params(params) == expected == 440_812
  shapes = jax.tree_util.tree_map(
      jnp.shape, jax.eval_shape(MnistCNN().init, jax.random.key(0), X_MNIST))
  assert shapes["params"]["conv1"]["kernel"] == (25, 20)
  assert shapes["params"]["conv2"]["kernel"] == (500, 50)


@pytest.mark.parametrize("features", [561, 768])
def test_har_mlp_parameter_count_and_shape(features):
  x = jnp.ones((5, features), jnp.float32)
  model = HarMLP()
  params = model.init(jax.random.key(0), x)
  assert num_params(params) == features * 256 + 256 + 256 * 256 + 256 + 256 * 6 + 6
  out = model.apply(params, x)
  assert out.shape == (5, 6) and out.dtype == jnp.float32
  small = HarMLP(num_classes=4, hidden=(32,))
  assert jax.eval_shape(small.apply, jax.eval_shape(small.init, jax.random.key(0), x), x).shape \
      == (5, 4)


def test_output_shape_and_dtype():
  model, params = _init_lax()
  for kwargs in ({}, {"conv_impl": "lax"}):
    m = MnistCNN(**kwargs)
    p = params if kwargs else conv_params_to_patches(params)
    out = m.apply(p, X_MNIST)
    assert out.shape == (3, 10) and out.dtype == jnp.float32
  # [B, 28, 28] without the channel axis is accepted too.
  assert MnistCNN().apply(conv_params_to_patches(params), X_MNIST[..., 0]).shape == (3, 10)


def test_patch_init_equals_nn_conv_init():
  """Same key -> the same numbers, with fan_in = kh*kw*cin (lecun_normal)."""
  _, p_lax = _init_lax(3)
  p_patch = MnistCNN().init(jax.random.key(3), X_MNIST)
  mapped = conv_params_to_patches(p_lax)
  jax.tree_util.tree_map(np.testing.assert_array_equal, mapped, p_patch)
  k2 = np.asarray(p_patch["params"]["conv2"]["kernel"])
  # lecun_normal: std 1/sqrt(fan_in) = 1/sqrt(500); loose statistical check.
  assert 0.8 / np.sqrt(500) < k2.std() < 1.2 / np.sqrt(500)
  assert np.all(np.asarray(p_patch["params"]["conv2"]["bias"]) == 0)


ALL_PATCH_CONFIGS = [
    dict(layout="nhwc", patch_impl=pi, pool_impl="reshape")
    for pi in ("slices", "slices_cmajor", "dilated")
] + [
    dict(layout="nhwc", patch_impl="slices", pool_impl=po) for po in ("reduce_window", "pairwise")
] + [
    dict(layout="cnhw", patch_impl=pi, pool_impl=po)
    for pi, po in (("flat", "reshape"), ("flat", "pairwise"), ("slices", "reshape"))
] + [
    dict(layout="nhwc", patch_impl="taps/slices", pool_impl="mask"),
    dict(layout="nhwc", patch_impl="taps", pool_impl="reshape"),
    dict(layout="cnhw/nhwc", patch_impl="flat/slices", pool_impl="reshape"),
]


@pytest.mark.parametrize("cfg", ALL_PATCH_CONFIGS, ids=lambda c: "-".join(c.values()))
def test_patch_variants_equal_nn_conv(cfg):
  model, params = _init_lax(1)
  ref = model.apply(params, X_MNIST)
  out = MnistCNN(**cfg).apply(conv_params_to_patches(params), X_MNIST)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _reference_forward(params, x):
  """Direct lax.conv_general_dilated + NumPy pooling: independent of models.py."""
  p = params["params"]
  def conv(x, name, cin):
    k = np.asarray(p[name]["kernel"]).reshape(5, 5, cin, -1)
    y = lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    return np.asarray(y) + np.asarray(p[name]["bias"])
  def pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  x = np.maximum(pool(conv(x, "conv1", 1)), 0)
  x = np.maximum(pool(conv(x, "conv2", 20)), 0).reshape(x.shape[0], -1)
  x = np.maximum(x @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"]), 0)
  return x @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])


def test_default_cnn_equals_direct_lax_conv_reference():
  params = MnistCNN().init(jax.random.key(2), X_MNIST)
  ref = _reference_forward(params, X_MNIST)
  out = MnistCNN().apply(params, X_MNIST)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_patch_conv_layer_against_numpy_loops():
  """One PatchConv in both layouts against a literal sum over the window."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 7, 3)).astype(np.float32)
  conv = models.PatchConv(4, (3, 2), "slices", "nhwc")
  params = conv.init(jax.random.key(0), x)
  k = np.asarray(params["params"]["kernel"]).reshape(3, 2, 3, 4)
  bias = rng.standard_normal(4).astype(np.float32)
  params = {"params": {"kernel": params["params"]["kernel"], "bias": bias}}
  ref = np.zeros((2, 7, 6, 4), np.float32)
  for r, s in itertools.product(range(7), range(6)):
    ref[:, r, s] = np.einsum("bijc,ijco->bo", x[:, r:r + 3, s:s + 2], k) + bias
  np.testing.assert_allclose(conv.apply(params, x), ref, rtol=1e-4, atol=1e-4)
  xc = np.transpose(x, (3, 0, 1, 2))
  for impl in ("flat", "slices"):
    out = models.PatchConv(4, (3, 2), impl, "cnhw").apply(params, xc)
    np.testing.assert_allclose(np.transpose(out, (1, 2, 3, 0)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [{}, dict(layout="nhwc", patch_impl="slices", pool_impl="mask")],
                         ids=["default", "mask_pool"])
def test_gradients_match_nn_conv(cfg):
  model, params = _init_lax(4)
  y = jnp.array([1, 7, 3])
  def loss(m, p):
    logits = m.apply(p, X_MNIST)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), y])
  g_ref = conv_params_to_patches(jax.grad(lambda p: loss(model, p))(params))
  g = jax.grad(lambda p: loss(MnistCNN(**cfg), p))(conv_params_to_patches(params))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         g, g_ref)


def test_vmap_over_per_model_params_equals_loop():
  model = MnistCNN()
  keys = jax.random.split(jax.random.key(5), 4)
  stacked = _stack([model.init(k, X_MNIST) for k in keys])
  xs = jax.random.uniform(jax.random.key(6), (4, 3, 28, 28, 1))
  out = jax.vmap(model.apply)(stacked, xs)
  assert out.shape == (4, 3, 10)
  apply = model.apply
  for i in range(4):
    p_i = jax.tree_util.tree_map(lambda a: a[i], stacked)
    np.testing.assert_allclose(out[i], apply(p_i, xs[i]), rtol=1e-5, atol=1e-5)
  # Batched conv_params_to_patches agrees with the per-model mapping.
  lax_model = MnistCNN(conv_impl="lax")
  stacked_lax = _stack([lax_model.init(k, X_MNIST) for k in keys])
  mapped = conv_params_to_patches(stacked_lax, batch_dims=1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, mapped, stacked)


def test_har_mlp_vmap_equals_loop():
  model = HarMLP()
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(jax.random.key(1), (3, 8, 561))
  stacked = _stack([model.init(k, x[0]) for k in keys])
  out = jax.vmap(model.apply)(stacked, x)
  apply = model.apply
  for i in range(3):
    np.testing.assert_allclose(
        out[i], apply(jax.tree_util.tree_map(lambda a: a[i], stacked), x[i]),
        rtol=1e-5, atol=1e-5)


def test_bad_options_raise():
  for bad in (dict(conv_impl="nope"), dict(layout="nchw"),
              dict(layout="nhwc", pool_impl="nope"), dict(layout="cnhw", patch_impl="dilated")):
    with pytest.raises(ValueError):
      jax.eval_shape(MnistCNN(**bad).init, jax.random.key(0), X_MNIST)


def test_flop_counts():
  assert models.mnist_cnn_macs() == 288_000 + 1_600_000 + 409_600 + 5_120
  assert models.mlp_macs(561) == 561 * 256 + 256 * 256 + 256 * 6
