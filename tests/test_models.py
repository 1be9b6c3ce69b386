"""Tests of ensemble_fl.models (sizes, shapes, vmap, against a direct lax
convolution) and of the benchmarks' CNN variants (each equals the reference)."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from benchmarks import bench_common, conv_variants
from ensemble_fl.models import HarMLP, MnistCNN, PatchConv, num_params

X_MNIST = np.asarray(jax.random.uniform(jax.random.key(7), (3, 28, 28, 1), jnp.float32))
Y_MNIST = jnp.array([1, 7, 3])


def _random_params(module, x, seed):
  """Params of ``module`` drawn with NumPy (N(0, 1/fan_in) kernels, small
  biases): running ``init`` eagerly costs seconds of op compilation per test."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  def draw(s):
    fan_in = s.shape[0] if len(s.shape) == 2 else np.prod(s.shape[:-1])
    scale = 1 / np.sqrt(fan_in) if len(s.shape) > 1 else 0.1
    return (scale * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map(draw, shapes)


def _stack(trees):
  return jax.tree_util.tree_map(lambda *a: np.stack(a), *trees)


def _reference_logits(params, x):
  """conv -> ReLU -> nn.max_pool, written with lax.conv_general_dilated on the
  HWIO view of the kernels: independent of how models.py builds its patches."""
  p = params["params"]

  def conv(x, name):
    cin = x.shape[-1]
    k = p[name]["kernel"].reshape(5, 5, cin, -1)
    y = lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    return y + p[name]["bias"]

  def pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")

  x = pool(jax.nn.relu(conv(x, "conv1")))
  x = pool(jax.nn.relu(conv(x, "conv2"))).reshape(x.shape[0], -1)
  x = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return x @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _loss(logits):
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), Y_MNIST])


def _logits_and_grads(apply_fn, params):
  """Logits on X_MNIST and the gradient of the loss (eager: the variants
  share most ops, so op-by-op compiles are reused across tests)."""
  def loss(p):
    logits = apply_fn(p, X_MNIST)
    return _loss(logits), logits
  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return logits, grads


def _assert_trees_close(a, b, rtol, atol):
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol),
                         a, b)


# ------------------------------------------------------- ensemble_fl.models


def test_mnist_cnn_parameter_count_and_shapes():
  expected = (5 * 5 * 1 * 20 + 20) + (5 * 5 * 20 * 50 + 50) + (800 * 512 + 512) + (512 * 10 + 10)
  params = jax.eval_shape(MnistCNN().init, jax.random.key(0), X_MNIST)
  assert num_params(params) == expected == 440_812
  shapes = jax.tree_util.tree_map(jnp.shape, params)["params"]
  assert shapes["conv1"]["kernel"] == (25, 20) and shapes["conv2"]["kernel"] == (500, 50)
  out = MnistCNN().apply(_random_params(MnistCNN(), X_MNIST, 0), X_MNIST[..., 0])
  assert out.shape == (3, 10) and out.dtype == jnp.float32   # [B, 28, 28] accepted


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


@pytest.mark.parametrize("impl", ["patches", "xla"])
@pytest.mark.parametrize("cin", [1, 3])   # conv1's patch convolution; conv2's stacked slices
def test_patch_conv_against_numpy_loops_and_nn_conv_init(cin, impl):
  rng = np.random.default_rng(cin)
  x = rng.standard_normal((2, 9, 7, cin)).astype(np.float32)
  conv = PatchConv(4, (3, 2), impl=impl)
  params = conv.init(jax.random.key(0), x)
  # Same key -> the very numbers nn.Conv draws (lecun_normal, fan_in kh*kw*cin).
  hwio = nn.Conv(4, (3, 2), padding="VALID").init(jax.random.key(0), x)["params"]["kernel"]
  np.testing.assert_array_equal(params["params"]["kernel"], np.reshape(hwio, (3 * 2 * cin, 4)))
  bias = rng.standard_normal(4).astype(np.float32)
  params = {"params": {"kernel": params["params"]["kernel"], "bias": bias}}
  k = np.asarray(hwio)
  ref = np.zeros((2, 7, 6, 4), np.float32)
  for r, s in itertools.product(range(7), range(6)):
    ref[:, r, s] = np.einsum("bijc,ijco->bo", x[:, r:r + 3, s:s + 2], k) + bias
  np.testing.assert_allclose(conv.apply(params, x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv_impl", ["patches", "xla"])
def test_mnist_cnn_forward_and_gradient_equal_direct_lax_reference(conv_impl):
  # Both implementations read the same parameters (the trainer's "patches"
  # models predict with "xla" on CPU).
  params = _random_params(MnistCNN(), X_MNIST, 2)
  logits, grads = _logits_and_grads(MnistCNN(conv_impl=conv_impl).apply, params)
  ref_logits, ref_grads = _logits_and_grads(_reference_logits, params)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
  _assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-5)


def test_patch_conv_rejects_unknown_impl():
  with pytest.raises(ValueError, match="impl must be one of"):
    PatchConv(4, impl="fft").init(jax.random.key(0), np.zeros((1, 5, 5, 1), np.float32))


def test_vmap_over_per_model_params_equals_loop():
  cases = [(MnistCNN(), jax.random.uniform(jax.random.key(6), (4, 3, 28, 28, 1))),
           (HarMLP(), jax.random.normal(jax.random.key(1), (4, 8, 561)))]
  for model, xs in cases:
    stacked = _stack([_random_params(model, xs[0], seed) for seed in range(4)])
    out = jax.vmap(model.apply)(stacked, xs)
    for i in range(4):
      p_i = jax.tree_util.tree_map(lambda a: a[i], stacked)
      np.testing.assert_allclose(out[i], model.apply(p_i, xs[i]), rtol=1e-5, atol=1e-5)


def test_benchmark_mac_counts_match_the_models_layers():
  """bench_common's analytic MACs: kernel size x output positions per layer."""
  shapes = jax.tree_util.tree_map(
      jnp.shape, jax.eval_shape(MnistCNN().init, jax.random.key(0), X_MNIST))["params"]
  positions = {"conv1": 24 * 24, "conv2": 8 * 8, "fc1": 1, "fc2": 1}
  assert bench_common.mnist_cnn_macs(3) == 3 * sum(
      np.prod(shapes[name]["kernel"]) * positions[name] for name in positions)
  har = jax.eval_shape(HarMLP().init, jax.random.key(0), jnp.ones((1, 561)))["params"]
  assert bench_common.mlp_macs(561) == sum(np.prod(v["kernel"].shape) for v in har.values())


# ------------------------------------------------ benchmarks/conv_variants.py


@pytest.fixture(scope="module")
def reference():
  """nn.Conv (HWIO) params, the same params in patch layout, and the
  reference's logits and gradient at them."""
  hwio = _random_params(conv_variants.VariantCNN(conv_impl="lax"), X_MNIST, 1)
  params = conv_variants.conv_params_to_patches(hwio)
  return (hwio, params, *_logits_and_grads(_reference_logits, params))


@pytest.mark.parametrize("name", list(conv_variants.VARIANTS))
def test_conv_variant_equals_reference(name, reference):
  """Each benchmarked variant gives the reference's logits and gradients."""
  hwio, params, ref_logits, ref_grads = reference
  kwargs = conv_variants.VARIANTS[name]
  model = conv_variants.VariantCNN(**kwargs)
  is_lax = kwargs.get("conv_impl") == "lax"
  params = hwio if is_lax else params
  logits, grads = _logits_and_grads(model.apply, params)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  if is_lax:
    grads = conv_variants.conv_params_to_patches(grads)
  _assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-5)


def test_default_variant_is_the_library_model(reference):
  params = reference[1]
  assert (jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      jax.eval_shape(conv_variants.VariantCNN().init, jax.random.key(0), X_MNIST)))
  np.testing.assert_array_equal(conv_variants.VariantCNN().apply(params, X_MNIST),
                                MnistCNN().apply(params, X_MNIST))
