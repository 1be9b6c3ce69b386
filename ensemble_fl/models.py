"""The paper's two networks as Flax linen modules.

Both are trained as ``jax.vmap`` over models (and over clients inside FedAvg),
so every parameter array acquires leading batch axes. A flax ``nn.Conv``
under that vmap becomes a *grouped* convolution (``feature_group_count`` =
number of models x clients), which XLA:CPU runs several times slower than the
equivalent batched matmul. :class:`MnistCNN` therefore writes each
convolution as explicit patch extraction plus one matmul with a
``[kh*kw*cin, cout]`` kernel; under vmap that becomes a batched ``dot_general``.
``MnistCNN(conv_impl="lax")`` keeps a plain ``nn.Conv`` for comparison.

Parameter layout of the patches convolution: ``kernel`` float32
``[kh*kw*cin, cout]`` whose rows are in ``(kh, kw, cin)`` order, i.e. exactly
``nn.Conv``'s HWIO kernel reshaped (see :func:`conv_params_to_patches`), and
``bias`` float32 ``[cout]``. Both implementations draw identical initial
values from the same key.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

CONV_IMPLS = ("patches", "lax")
PATCH_IMPLS = ("slices", "slices_cmajor", "dilated")
POOL_IMPLS = ("reshape", "reduce_window")


def _hwio_init(kernel_size: tuple[int, int], cin: int, base=None):
  """lecun_normal for a ``[kh*kw*cin, cout]`` kernel, drawn as nn.Conv draws it.

  Drawing the HWIO tensor and reshaping gives fan_in = kh*kw*cin (what
  nn.Conv uses) and the very same numbers as ``nn.Conv`` for the same key,
  so the two conv implementations start from one function.
  """
  base = base or nn.initializers.lecun_normal()
  kh, kw = kernel_size

  def init(key, shape, dtype=jnp.float32):
    rows, cout = shape
    assert rows == kh * kw * cin, (shape, kernel_size, cin)
    return base(key, (kh, kw, cin, cout), dtype).reshape(rows, cout)

  return init


def extract_patches(x: Array, kernel_size: tuple[int, int], impl: str = "slices") -> Array:
  """All VALID, stride-1 patches of an NHWC image batch.

  Args:
    x: float ``[B, H, W, C]``.
    kernel_size: ``(kh, kw)``.
    impl: ``"slices"``: kh*kw shifted slices stacked, features in
      ``(kh, kw, C)`` order; ``"slices_cmajor"``: the same slices, features in
      ``(C, kh, kw)`` order; ``"dilated"``: ``lax.conv_general_dilated_patches``
      (``(C, kh, kw)`` order; it is a convolution with a one-hot kernel, so it
      costs ``(kh*kw*C)**2`` MACs per pixel).

  Returns:
    float ``[B, H-kh+1, W-kw+1, kh*kw*C]`` in the dtype of ``x``.
  """
  kh, kw = kernel_size
  b, h, w, c = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  if impl == "dilated":
    return lax.conv_general_dilated_patches(
        x, (kh, kw), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  slices = [x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]
  if impl == "slices":
    p = jnp.stack(slices, axis=3)            # [B, ho, wo, kh*kw, C]
  elif impl == "slices_cmajor":
    p = jnp.stack(slices, axis=4)            # [B, ho, wo, C, kh*kw]
  else:
    raise ValueError(f"unknown patch impl {impl!r}; expected one of {PATCH_IMPLS}")
  return p.reshape(b, ho, wo, kh * kw * c)


def _kernel_rows_for(kernel: Array, kernel_size, cin: int, impl: str) -> Array:
  """Permutes ``(kh, kw, cin)``-ordered kernel rows to the patch feature order."""
  if impl == "slices" or cin == 1:
    return kernel
  kh, kw = kernel_size
  cout = kernel.shape[-1]
  # (C, kh, kw) order: the permutation acts on the tiny kernel, not the patches.
  return kernel.reshape(kh, kw, cin, cout).transpose(2, 0, 1, 3).reshape(-1, cout)


class PatchConv(nn.Module):
  """VALID, stride-1 2-D convolution as patches @ kernel.

  Attributes:
    features: output channels ``cout``.
    kernel_size: ``(kh, kw)``.
    patch_impl: one of :data:`PATCH_IMPLS`.
  Input float32 ``[B, H, W, cin]``; output float32 ``[B, H-kh+1, W-kw+1, cout]``.
  Params: ``kernel`` ``[kh*kw*cin, cout]`` (rows in ``(kh, kw, cin)`` order),
  ``bias`` ``[cout]``.
  """

  features: int
  kernel_size: tuple[int, int] = (5, 5)
  patch_impl: str = "slices"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param("kernel", _hwio_init(self.kernel_size, cin),
                        (kh * kw * cin, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    p = extract_patches(x.astype(dtype), self.kernel_size, self.patch_impl)
    k = _kernel_rows_for(kernel, self.kernel_size, cin, self.patch_impl).astype(dtype)
    y = jnp.einsum("bhwk,kc->bhwc", p, k, preferred_element_type=jnp.float32)
    return y + bias


def max_pool_2x2(x: Array, impl: str = "reshape") -> Array:
  """2x2 max pooling, stride 2, of ``[B, H, W, C]`` (H, W even) -> ``[B, H/2, W/2, C]``."""
  if impl == "reshape":
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  if impl == "reduce_window":
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  raise ValueError(f"unknown pool impl {impl!r}; expected one of {POOL_IMPLS}")


class MnistCNN(nn.Module):
  """The paper's MNIST CNN.

  conv 5x5x20 + ReLU, maxpool 2x2, conv 5x5x50 + ReLU, maxpool 2x2,
  FC 512 + ReLU, FC 10 (softmax belongs to the loss). 440,812 parameters:
  conv1 5*5*1*20+20, conv2 5*5*20*50+50, fc1 800*512+512, fc2 512*10+10.

  Attributes:
    num_classes: logits width (10).
    conv_impl: ``"patches"`` (default, fast under vmap) or ``"lax"`` (nn.Conv).
    patch_impl: patch extraction for ``"patches"``, one of :data:`PATCH_IMPLS`.
    pool_impl: one of :data:`POOL_IMPLS`.
    dtype: computation dtype (None: the input's); params stay float32.

  Input float32 ``[B, 28, 28, 1]`` (pixels / 255); output float32 logits
  ``[B, num_classes]``.
  """

  num_classes: int = 10
  conv_impl: str = "patches"
  patch_impl: str = "slices"
  pool_impl: str = "reshape"
  dtype: Any = None

  def _conv(self, x: Array, features: int, name: str) -> Array:
    if self.conv_impl == "patches":
      return PatchConv(features, (5, 5), self.patch_impl, self.dtype, name=name)(x)
    if self.conv_impl == "lax":
      return nn.Conv(features, (5, 5), padding="VALID", dtype=self.dtype, name=name)(x)
    raise ValueError(f"unknown conv impl {self.conv_impl!r}; expected one of {CONV_IMPLS}")

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim == 3:
      x = x[..., None]
    x = nn.relu(self._conv(x, 20, "conv1"))         # [B, 24, 24, 20]
    x = max_pool_2x2(x, self.pool_impl)              # [B, 12, 12, 20]
    x = nn.relu(self._conv(x, 50, "conv2"))         # [B, 8, 8, 50]
    x = max_pool_2x2(x, self.pool_impl)              # [B, 4, 4, 50]
    x = x.reshape(x.shape[0], -1)                    # [B, 800]
    x = nn.relu(nn.Dense(512, dtype=self.dtype, name="fc1")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)
    return x.astype(jnp.float32)


class HarMLP(nn.Module):
  """The paper's HAR MLP: F -> 256 -> 256 -> num_classes, ReLU.

  Input float32 ``[B, F]``; output float32 logits ``[B, num_classes]``.
  """

  num_classes: int = 6
  hidden: Sequence[int] = (256, 256)
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i + 1}")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name=f"fc{len(self.hidden) + 1}")(x)
    return x.astype(jnp.float32)


def conv_params_to_patches(params: Any, batch_dims: int = 0) -> Any:
  """Maps ``MnistCNN(conv_impl="lax")`` params to ``conv_impl="patches"`` ones.

  Args:
    params: a params pytree of ``MnistCNN(conv_impl="lax")`` (with or without
      the top-level ``"params"`` collection key).
    batch_dims: number of leading (vmap) axes on every leaf.

  Returns:
    The same pytree with each conv ``kernel`` ``[*lead, kh, kw, cin, cout]``
    reshaped to ``[*lead, kh*kw*cin, cout]``; other leaves unchanged.
  """
  def fix(path, leaf):
    names = [str(getattr(k, "key", "")) for k in path]
    if names[-1] == "kernel" and any(n.startswith("conv") for n in names):
      lead = leaf.shape[:batch_dims]
      kh, kw, cin, cout = leaf.shape[batch_dims:]
      return leaf.reshape(*lead, kh * kw * cin, cout)
    return leaf
  return jax.tree_util.tree_map_with_path(fix, params)


def num_params(params: Any) -> int:
  """Total number of scalars in a params pytree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def mnist_cnn_macs(batch: int = 1) -> int:
  """Multiply-accumulates of one MnistCNN forward pass on ``batch`` examples."""
  conv1 = 24 * 24 * (5 * 5 * 1) * 20
  conv2 = 8 * 8 * (5 * 5 * 20) * 50
  fc = 800 * 512 + 512 * 10
  return batch * (conv1 + conv2 + fc)


def mlp_macs(features: int, hidden: Sequence[int] = (256, 256), num_classes: int = 6,
             batch: int = 1) -> int:
  """Multiply-accumulates of one HarMLP forward pass on ``batch`` examples."""
  widths = [features, *hidden, num_classes]
  return batch * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
