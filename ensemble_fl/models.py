"""The paper's two networks as Flax linen modules: MnistCNN and HarMLP.

Both are trained as ``jax.vmap`` over models (and over clients inside FedAvg),
so every parameter array acquires leading batch axes. A flax ``nn.Conv``
under that vmap becomes a *grouped* convolution (``feature_group_count`` =
number of models x clients), which XLA:CPU runs several times slower than the
equivalent batched matmul. :class:`MnistCNN` therefore writes each
convolution as explicit patch extraction plus one matmul with a
``[kh*kw*cin, cout]`` kernel; under vmap that becomes a batched
``dot_general``. The other implementations that were measured (channel-major
layouts, other patch and pooling schemes, ``nn.Conv``) live in
``benchmarks/conv_variants.py``, with their timings in ``benchmarks/README.md``.

Where a model is *not* vmapped -- prediction on CPU, which runs the models one
after another -- XLA's own convolution is the faster program (1.7x for ensemble
prediction on the idle 2-core CPU, ``benchmarks/predict_bench.py``),
so :class:`PatchConv` also has ``impl="xla"``: the same function of the same
parameters, computed by ``lax.conv_general_dilated``.

Parameter layout of :class:`PatchConv`: ``kernel`` float32
``[kh*kw*cin, cout]`` whose rows are in ``(kh, kw, cin)`` order, i.e. exactly
``nn.Conv``'s HWIO kernel reshaped, and ``bias`` float32 ``[cout]``. Its
initial values are the ones ``nn.Conv`` draws from the same key.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# PatchConv's implementations (see its docstring).
CONV_IMPLS = ("patches", "xla")


def patch_kernel_init(kernel_size: tuple[int, int], cin: int, base=None):
  """lecun_normal for a ``[kh*kw*cin, cout]`` kernel, drawn as nn.Conv draws it.

  Drawing the HWIO tensor and reshaping gives fan_in = kh*kw*cin (what
  nn.Conv uses) and the very same numbers as ``nn.Conv`` for the same key.

  Args:
    kernel_size: ``(kh, kw)``.
    cin: input channels.
    base: initializer of the HWIO tensor (default lecun_normal).

  Returns:
    An initializer ``init(key, (kh*kw*cin, cout), dtype) -> [kh*kw*cin, cout]``.
  """
  base = base or nn.initializers.lecun_normal()
  kh, kw = kernel_size

  def init(key, shape, dtype=jnp.float32):
    rows, cout = shape
    assert rows == kh * kw * cin, (shape, kernel_size, cin)
    return base(key, (kh, kw, cin, cout), dtype).reshape(rows, cout)

  return init


def _patches(x: Array, kernel_size: tuple[int, int]) -> Array:
  """All VALID, stride-1 patches of ``x`` float ``[B, H, W, C]``.

  Returns ``[B, H-kh+1, W-kw+1, kh*kw*C]``, features in ``(kh, kw, C)`` order.
  """
  kh, kw = kernel_size
  b, h, w, c = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  if c == 1:
    # One input channel (conv1: the images): stacking kh*kw slices of one
    # float each is the slowest copy of the step, so use XLA's own patch
    # convolution (a one-hot kernel; its features are in (C, kh, kw) order,
    # which is (kh, kw, C) when C = 1). Its input is data, so it is never
    # differentiated; on conv2 it would be, and it measured much slower.
    return lax.conv_general_dilated_patches(
        x, (kh, kw), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  slices = [x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]
  return jnp.stack(slices, axis=3).reshape(b, ho, wo, kh * kw * c)


class PatchConv(nn.Module):
  """VALID, stride-1 2-D convolution on NHWC maps, as patches @ kernel.

  Attributes:
    features: output channels ``cout``.
    kernel_size: ``(kh, kw)``.
    dtype: computation dtype (None: the input's); params stay float32 and the
      output is float32.
    impl: "patches" (patches @ kernel: a batched matmul under vmap, the
      trainer's choice) or "xla" (``lax.conv_general_dilated`` with the kernel
      reshaped to HWIO: fastest for a model that is not vmapped, a grouped
      convolution under vmap). Same parameters, same function up to float
      rounding.

  Input float ``[B, H, W, cin]``; output float32 ``[B, H-kh+1, W-kw+1, cout]``.
  Params: ``kernel`` float32 ``[kh*kw*cin, cout]`` (rows in ``(kh, kw, cin)``
  order: nn.Conv's HWIO kernel reshaped), ``bias`` float32 ``[cout]``.
  """

  features: int
  kernel_size: tuple[int, int] = (5, 5)
  dtype: Any = None
  impl: str = "patches"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.impl not in CONV_IMPLS:
      raise ValueError(f"impl must be one of {CONV_IMPLS}, got {self.impl!r}")
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param("kernel", patch_kernel_init(self.kernel_size, cin),
                        (kh * kw * cin, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    if self.impl == "xla":
      y = lax.conv_general_dilated(x, kernel.reshape(kh, kw, cin, self.features), (1, 1),
                                   "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      y = jnp.einsum("bhwk,kc->bhwc", _patches(x, self.kernel_size), kernel)
    return y.astype(jnp.float32) + bias


def _max_pool_2x2(x: Array) -> Array:
  """2x2 max pooling with stride 2: float ``[B, H, W, C]`` -> ``[B, H/2, W/2, C]``.

  Reshape + max: its gradient measured faster than ``nn.max_pool``'s
  (reduce_window, whose gradient is select_and_scatter).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MnistCNN(nn.Module):
  """The paper's MNIST CNN.

  conv 5x5x20 + ReLU, maxpool 2x2, conv 5x5x50 + ReLU, maxpool 2x2,
  FC 512 + ReLU, FC 10 (softmax belongs to the loss). 440,812 parameters:
  conv1 5*5*1*20+20, conv2 5*5*20*50+50, fc1 800*512+512, fc2 512*10+10.
  Pooling is applied before the ReLU (the two commute) so the ReLU touches
  4x fewer values.

  Attributes:
    num_classes: logits width (10).
    dtype: computation dtype (None: the input's); params stay float32.
    conv_impl: the convolutions' :class:`PatchConv` ``impl``; the parameters
      do not depend on it, so a model trained with "patches" can predict with
      "xla".

  Input float32 ``[B, 28, 28, 1]`` (pixels / 255; ``[B, 28, 28]`` also
  accepted); output float32 logits ``[B, num_classes]``. The flatten before
  fc1 is in NHWC order.
  """

  num_classes: int = 10
  dtype: Any = None
  conv_impl: str = "patches"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim == 3:
      x = x[..., None]
    b = x.shape[0]
    conv1 = PatchConv(20, (5, 5), self.dtype, self.conv_impl, name="conv1")
    conv2 = PatchConv(50, (5, 5), self.dtype, self.conv_impl, name="conv2")
    x = nn.relu(_max_pool_2x2(conv1(x)))            # [B, 12, 12, 20]
    x = nn.relu(_max_pool_2x2(conv2(x)))            # [B, 4, 4, 50]
    x = x.reshape(b, -1)                            # [B, 800]
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


def num_params(params: Any) -> int:
  """Total number of scalars in a params pytree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
