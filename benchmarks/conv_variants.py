"""MNIST CNN implementation variants timed by ``conv_bench.py``.

``ensemble_fl.models.MnistCNN`` is the variant that measured fastest on the
2-core CPU (``benchmarks/README.md``: NHWC, conv1 patches by
``lax.conv_general_dilated_patches``, conv2 patches by stacked slices,
reshape + max pooling). The others are kept here so that the measurements can
be repeated: channel-major layouts, other patch and pooling schemes, and
``nn.Conv`` itself (a grouped convolution under vmap). Every variant computes
the same function from the same parameters (``tests/test_models.py`` checks
each one against ``nn.Conv``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ensemble_fl.models import patch_kernel_init

Array = jax.Array

CONV_IMPLS = ("patches", "lax")
# Activation layouts of the patches implementation:
#   "nhwc": [B, H, W, C], patches [B, Ho, Wo, kh*kw*C] (the textbook im2col);
#   "cnhw": [C, B, H, W], patches [C*kh*kw, B, ...]: every window slice is
#           a block of whole image rows, so building patches (and scattering
#           their gradient back) moves long contiguous runs instead of
#           C-float snippets, and each conv is one GEMM kernel^T @ patches.
LAYOUTS = ("nhwc", "cnhw")
# Patch extraction: "slices" (exact windows), "slices_cmajor" (nhwc only,
# features in (C, kh, kw) order), "dilated" (nhwc only,
# lax.conv_general_dilated_patches), "flat" (cnhw only: windows over the
# flattened H*W axis, one contiguous run per (channel, image, tap); computes
# Ho*W outputs per image and drops the kw-1 wrapped-around columns),
# "taps" (nhwc only: the kh*kw window slices stacked on a new leading axis,
# [kh*kw, B, Ho, Wo, C], each slice one contiguous block, contracted over
# (tap, C) by one dot).
PATCH_IMPLS = ("slices", "slices_cmajor", "dilated", "flat", "taps")
POOL_IMPLS = ("reshape", "reduce_window", "pairwise", "mask")


def extract_patches(x: Array, kernel_size: tuple[int, int], impl: str = "slices") -> Array:
  """All VALID, stride-1 patches of an NHWC image batch.

  Args:
    x: float ``[B, H, W, C]``.
    kernel_size: ``(kh, kw)``.
    impl: ``"slices"``: kh*kw shifted slices stacked, features in
      ``(kh, kw, C)`` order; ``"slices_cmajor"``: the same slices, features in
      ``(C, kh, kw)`` order; ``"dilated"``: ``lax.conv_general_dilated_patches``
      (``(C, kh, kw)`` order; a depthwise convolution with a one-hot kernel).

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
    raise ValueError(f"unknown nhwc patch impl {impl!r}")
  return p.reshape(b, ho, wo, kh * kw * c)


def extract_patches_cnhw(x: Array, kernel_size: tuple[int, int], impl: str = "flat") -> Array:
  """All VALID, stride-1 patches of a channel-major ``[C, B, H, W]`` batch.

  Args:
    x: float ``[C, B, H, W]``.
    kernel_size: ``(kh, kw)``.
    impl: ``"flat"`` or ``"slices"`` (see :data:`PATCH_IMPLS`).

  Returns:
    float ``[C*kh*kw, B, L]``, rows in ``(C, kh, kw)`` order; ``L = Ho*W``
    for ``"flat"`` (column ``w >= Wo`` of each output row is garbage that
    the caller drops) and ``L = Ho*Wo`` for ``"slices"``.
  """
  kh, kw = kernel_size
  c, b, h, w = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  if impl == "flat":
    # Output pixel (r, s) reads flat index r*W + s + (i*W + j): one shifted
    # contiguous window per tap. kw-1 zeros keep the last window in bounds.
    xf = jnp.pad(x.reshape(c, b, h * w), ((0, 0), (0, 0), (0, kw - 1)))
    n = ho * w
    taps = [xf[:, :, i * w + j:i * w + j + n] for i in range(kh) for j in range(kw)]
    p = jnp.stack(taps, axis=1)              # [C, kh*kw, B, Ho*W]
    return p.reshape(c * kh * kw, b, n)
  if impl == "slices":
    taps = [x[:, :, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)]
    p = jnp.stack(taps, axis=1)              # [C, kh*kw, B, Ho, Wo]
    return p.reshape(c * kh * kw, b, ho * wo)
  raise ValueError(f"unknown cnhw patch impl {impl!r}")


def _kernel_rows_cmajor(kernel: Array, kernel_size, cin: int) -> Array:
  """Permutes ``(kh, kw, cin)``-ordered kernel rows to ``(cin, kh, kw)`` order."""
  if cin == 1:
    return kernel
  kh, kw = kernel_size
  cout = kernel.shape[-1]
  # The permutation acts on the small kernel, never on the patches.
  return kernel.reshape(kh, kw, cin, cout).transpose(2, 0, 1, 3).reshape(-1, cout)


class VariantPatchConv(nn.Module):
  """VALID, stride-1 2-D convolution as patches @ kernel.

  Attributes:
    features: output channels ``cout``.
    kernel_size: ``(kh, kw)``.
    patch_impl: one of :data:`PATCH_IMPLS` valid for ``layout``.
    layout: ``"nhwc"``: input ``[B, H, W, cin]``, output
      ``[B, Ho, Wo, cout]``; ``"cnhw"``: input ``[cin, B, H, W]``, output
      ``[cout, B, Ho, Wo]`` (Ho = H-kh+1, Wo = W-kw+1). float32 unless
      ``dtype`` says otherwise (accumulation is float32).
  Params: ``kernel`` float32 ``[kh*kw*cin, cout]`` (rows in ``(kh, kw, cin)``
  order, nn.Conv's HWIO kernel reshaped), ``bias`` float32 ``[cout]``.
  """

  features: int
  kernel_size: tuple[int, int] = (5, 5)
  patch_impl: str = "slices"
  layout: str = "nhwc"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = self.kernel_size
    cin = x.shape[-1] if self.layout == "nhwc" else x.shape[0]
    kernel = self.param("kernel", patch_kernel_init(self.kernel_size, cin),
                        (kh * kw * cin, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    if self.layout == "nhwc" and self.patch_impl == "taps":
      _, h, w, _ = x.shape
      ho, wo = h - kh + 1, w - kw + 1
      p = jnp.stack([x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)])
      k = kernel.reshape(kh * kw, cin, self.features).astype(dtype)
      y = jnp.einsum("tbhwc,tco->bhwo", p, k).astype(jnp.float32)
      return y + bias
    if self.layout == "nhwc":
      impl = self.patch_impl
      p = extract_patches(x, self.kernel_size, impl)
      k = kernel if impl == "slices" else _kernel_rows_cmajor(kernel, self.kernel_size, cin)
      y = jnp.einsum("bhwk,kc->bhwc", p, k.astype(dtype)).astype(jnp.float32)
      return y + bias
    if self.layout != "cnhw":
      raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")
    _, b, h, w = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    p = extract_patches_cnhw(x, self.kernel_size, self.patch_impl)   # [K, B, L]
    k = _kernel_rows_cmajor(kernel, self.kernel_size, cin).astype(dtype)
    # kernel^T @ patches: one GEMM whose output is already channel-major.
    y = jnp.einsum("ko,kbl->obl", k, p).astype(jnp.float32)
    if self.patch_impl == "flat":
      y = y.reshape(self.features, b, ho, w)[..., :wo]
    else:
      y = y.reshape(self.features, b, ho, wo)
    return y + bias[:, None, None, None]


def _window_shape(shape, spatial):
  ha, wa = spatial
  shape = list(shape)
  return (shape[:ha] + [shape[ha] // 2, 2] + shape[ha + 1:wa] + [shape[wa] // 2, 2]
          + shape[wa + 1:]), (ha + 1, wa + 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_mask(x: Array, spatial: tuple[int, int]) -> Array:
  shape, axes = _window_shape(x.shape, spatial)
  return x.reshape(shape).max(axis=axes)


def _max_pool_mask_fwd(x, spatial):
  y = _max_pool_mask(x, spatial)
  return y, (x, y)


def _max_pool_mask_bwd(spatial, res, g):
  # One fused select instead of jnp.max's indicator/count/divide passes. On a
  # tie every maximal entry gets the full cotangent (jnp.max splits it); ties
  # need exactly equal pre-activations, since pooling runs before the ReLU.
  x, y = res
  shape, axes = _window_shape(x.shape, spatial)
  xw = x.reshape(shape)
  yb = jnp.expand_dims(y, axes)
  gb = jnp.expand_dims(g, axes)
  return (jnp.where(xw == yb, gb, jnp.zeros((), g.dtype)).reshape(x.shape),)


_max_pool_mask.defvjp(_max_pool_mask_fwd, _max_pool_mask_bwd)


def max_pool_2x2(x: Array, impl: str = "reshape", spatial: tuple[int, int] = (1, 2)) -> Array:
  """2x2 max pooling with stride 2 over the two (even) ``spatial`` axes.

  Args:
    x: float array, e.g. ``[B, H, W, C]`` with ``spatial=(1, 2)`` or
      ``[C, B, H, W]`` with ``spatial=(2, 3)``.
    impl: ``"reshape"`` (reshape + max), ``"reduce_window"`` (nn.max_pool,
      NHWC only), ``"pairwise"`` (maximum of the four strided sub-grids) or
      ``"mask"`` (reshape + max with a one-pass select gradient).

  Returns:
    ``x`` with both spatial sizes halved.
  """
  ha, wa = spatial
  if impl == "reduce_window":
    if spatial != (1, 2):
      raise ValueError("reduce_window pooling is NHWC only")
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  if impl == "reshape":
    shape, axes = _window_shape(x.shape, spatial)
    return x.reshape(shape).max(axis=axes)
  if impl == "mask":
    return _max_pool_mask(x, tuple(spatial))
  if impl == "pairwise":
    def sub(i, j):
      idx = [slice(None)] * x.ndim
      idx[ha] = slice(i, None, 2)
      idx[wa] = slice(j, None, 2)
      return x[tuple(idx)]
    return jnp.maximum(jnp.maximum(sub(0, 0), sub(0, 1)), jnp.maximum(sub(1, 0), sub(1, 1)))
  raise ValueError(f"unknown pool impl {impl!r}; expected one of {POOL_IMPLS}")


class VariantCNN(nn.Module):
  """The paper's MNIST CNN with a choice of convolution, layout and pooling.

  The same network as ``ensemble_fl.models.MnistCNN`` (same parameter tree,
  same function); ``conv_impl="patches", layout="nhwc",
  patch_impl="dilated/slices", pool_impl="reshape"`` is exactly that model.

  Attributes:
    num_classes: logits width (10).
    conv_impl: ``"patches"`` or ``"lax"`` (nn.Conv, HWIO kernels; map its
      params with :func:`conv_params_to_patches`).
    layout: activation layout of ``"patches"``, one of :data:`LAYOUTS`, or
      ``"conv1_layout/conv2_layout"`` (e.g. ``"cnhw/nhwc"``: the pooled
      conv1 maps are transposed between the two).
    patch_impl: patch extraction of ``"patches"``, one of :data:`PATCH_IMPLS`
      (valid for the layout), or ``"conv1_impl/conv2_impl"``.
    pool_impl: one of :data:`POOL_IMPLS`.
    dtype: computation dtype (None: the input's); params stay float32.

  Input float32 ``[B, 28, 28, 1]`` (or ``[B, 28, 28]``); output float32
  logits ``[B, num_classes]``. The flatten before fc1 is in NHWC order in
  every layout, so params are interchangeable.
  """

  num_classes: int = 10
  conv_impl: str = "patches"
  layout: str = "nhwc"
  patch_impl: str = "dilated/slices"
  pool_impl: str = "reshape"
  dtype: Any = None

  def _per_layer(self, value: str) -> tuple[str, str]:
    parts = value.split("/")
    if len(parts) not in (1, 2):
      raise ValueError(f"expected 'a' or 'conv1/conv2', got {value!r}")
    return (parts[0], parts[-1])

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim == 3:
      x = x[..., None]
    b = x.shape[0]
    if self.conv_impl == "lax":
      layouts, impls = ("nhwc", "nhwc"), (None, None)
    elif self.conv_impl == "patches":
      layouts, impls = self._per_layer(self.layout), self._per_layer(self.patch_impl)
      for lay in layouts:
        if lay not in LAYOUTS:
          raise ValueError(f"unknown layout {lay!r}; expected one of {LAYOUTS}")
    else:
      raise ValueError(f"unknown conv impl {self.conv_impl!r}; expected one of {CONV_IMPLS}")

    def conv(x, features, i):
      name = f"conv{i + 1}"
      if self.conv_impl == "lax":
        return nn.Conv(features, (5, 5), padding="VALID", dtype=self.dtype, name=name)(x)
      return VariantPatchConv(features, (5, 5), impls[i], layouts[i], self.dtype, name=name)(x)

    def to_layout(x, current, wanted):
      if current == wanted:
        return x
      return jnp.transpose(x, (3, 0, 1, 2) if wanted == "cnhw" else (1, 2, 3, 0))

    def pool(x, lay):
      return nn.relu(max_pool_2x2(x, self.pool_impl, (1, 2) if lay == "nhwc" else (2, 3)))

    x = to_layout(x, "nhwc", layouts[0])             # [B, 28, 28, 1] or [1, B, 28, 28]
    x = pool(conv(x, 20, 0), layouts[0])             # 24x24 -> 12x12, 20 channels
    # A layout switch happens here, on the pooled (4x smaller) maps.
    x = to_layout(x, layouts[0], layouts[1])
    x = pool(conv(x, 50, 1), layouts[1])             # 8x8 -> 4x4, 50 channels
    x = to_layout(x, layouts[1], "nhwc")             # [B, 4, 4, 50]
    x = x.reshape(b, -1)                             # [B, 800], NHWC order
    x = nn.relu(nn.Dense(512, dtype=self.dtype, name="fc1")(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)
    return x.astype(jnp.float32)


def conv_params_to_patches(params: Any) -> Any:
  """Maps ``VariantCNN(conv_impl="lax")`` params to the patches layout.

  Args:
    params: a params pytree of ``VariantCNN(conv_impl="lax")`` (with or
      without the top-level ``"params"`` collection key), or its gradient.

  Returns:
    The same pytree with each conv ``kernel`` ``[kh, kw, cin, cout]``
    reshaped to ``[kh*kw*cin, cout]``; other leaves unchanged.
  """
  def fix(path, leaf):
    names = [str(getattr(k, "key", "")) for k in path]
    if names[-1] == "kernel" and any(n.startswith("conv") for n in names):
      kh, kw, cin, cout = leaf.shape
      return leaf.reshape(kh * kw * cin, cout)
    return leaf
  return jax.tree_util.tree_map_with_path(fix, params)


# The variants conv_bench.py times, as VariantCNN keyword arguments.
VARIANTS = {
    "lax_conv": dict(conv_impl="lax", pool_impl="reduce_window"),
    "lax_conv+reshape_pool": dict(conv_impl="lax", pool_impl="reshape"),
    "nhwc dilated": dict(layout="nhwc", patch_impl="dilated", pool_impl="reshape"),
    "nhwc slices+mask": dict(layout="nhwc", patch_impl="slices", pool_impl="mask"),
    "nhwc slices_cmajor": dict(layout="nhwc", patch_impl="slices_cmajor", pool_impl="reshape"),
    "nhwc slices+reduce_window": dict(layout="nhwc", patch_impl="slices",
                                      pool_impl="reduce_window"),
    "nhwc slices": dict(layout="nhwc", patch_impl="slices", pool_impl="reshape"),
    "nhwc slices+pairwise": dict(layout="nhwc", patch_impl="slices", pool_impl="pairwise"),
    "nhwc taps": dict(layout="nhwc", patch_impl="taps", pool_impl="reshape"),
    "nhwc taps/slices": dict(layout="nhwc", patch_impl="taps/slices", pool_impl="reshape"),
    "nhwc dilated/slices+mask": dict(layout="nhwc", patch_impl="dilated/slices",
                                     pool_impl="mask"),
    "nhwc taps/slices+mask": dict(layout="nhwc", patch_impl="taps/slices", pool_impl="mask"),
    "nhwc taps/slices+rw": dict(layout="nhwc", patch_impl="taps/slices",
                                pool_impl="reduce_window"),
    "cnhw/nhwc flat/slices": dict(layout="cnhw/nhwc", patch_impl="flat/slices",
                                  pool_impl="reshape"),
    "cnhw/nhwc slices/slices": dict(layout="cnhw/nhwc", patch_impl="slices/slices",
                                    pool_impl="reshape"),
    "cnhw slices": dict(layout="cnhw", patch_impl="slices", pool_impl="reshape"),
    "cnhw flat+pairwise": dict(layout="cnhw", patch_impl="flat", pool_impl="pairwise"),
    "cnhw flat": dict(layout="cnhw", patch_impl="flat", pool_impl="reshape"),
}
