"""GCViT, the Global Context Vision Transformer, in Keras 3 (paper Section 2.5 and Figure 2, stage 1
image branch).

The paper "Intelligent Cervical Spine Fracture Detection Using Deep Learning Methods" (2023) classifies
the vertebrae C1..C7 visible in each axial slice with a pre-trained GCViT-tiny
(Hatamizadeh et al., "Global Context Vision Transformers", ICML 2023, arXiv 2206.09959). This module
is a backend-agnostic Keras 3 implementation (``keras.ops`` only, functional API, every layer
serialisable), numerically equivalent to ``timm.models.gcvit`` (checked to 1e-4 in the tests) and
laid out like NVIDIA's reference code:

```
image -> patch_embed (conv 3x3/2 + ReduceSize)           stride 4
      -> levels_0 .. levels_3 (blocks, then ReduceSize)    each level ends with its own downsample
      -> norm (LayerNorm)                                  the last level has no downsample
      -> [pooling] -> [head]
```

Each level alternates local window attention (even blocks) with global-query attention (odd
blocks): the global query is a ``window x window`` summary of the whole feature map made by
``GlobalQueryGen`` (MBConv + max-pool steps) and shared by every window of the same image.

Window sizes follow timm: ``window = image_size // window_ratio`` per level (ratios
``(32, 32, 16, 32)`` give windows ``(7, 7, 14, 7)`` at 224 px); the feature map of every level must
be divisible by its window, and the global query generator must reduce it exactly to the window.
Sizes that break either rule raise a ValueError quoting them.

Speed notes: tokens stay in window layout ``(batch, windows, tokens, channels)`` for a whole level
(layer norms and MLPs are token-wise), so a level does one partition and one reverse, both plain
reshape/transpose; global queries are broadcast by the batched matmul rather than tiled.

Variants are small named constructors (``gcvit_xxtiny`` ... ``gcvit_base``, configs as in timm).
``weights=`` loads a timm state dict (see :mod:`keras_cspine.stage1.models.weights`; NVIDIA's ImageNet
weights are licensed CC-BY-NC-SA-4.0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_cspine.stage1.models.gcvit_presets import GCVIT_VARIANTS, IMAGENET_MEAN, IMAGENET_STD
from keras_cspine.stage1.models.registry import PAPER_PARAMETERS, ModelSpec, register_model
from keras_cspine.stage1.models.weights import load_gcvit_weights

LAYER_NORM_EPSILON = 1e-5
_PACKAGE = "keras_cspine"


def _gelu(x):
    return keras.activations.gelu(x, approximate=False)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), as timm does."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    if isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, (int, np.integer)) for v in value
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")


def _pad_hw(x, value: float = 0.0):
    """Pad height and width by one on each side (torch ``padding=1``)."""
    return ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=value)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def gcvit_geometry(
    image_size,
    num_levels: int = 4,
    window_ratio: Sequence[int] | int | None = (32, 32, 16, 32),
    window_size: Sequence | int | None = None,
) -> list[dict]:
    """Feature size, window size and global-query pooling steps of each level.

    Follows timm: windows are ``image_size // window_ratio`` unless ``window_size`` is given (one
    int or pair for all levels, or one per level); a level of feature size ``f`` and window ``w``
    pools its global query ``int(log2(min(f) / min(w)))`` times. A given window larger than its
    feature map shrinks to the map (one window, attention over the whole map), so that a config
    written for one image size still builds at a smaller one.

    Returns:
        One dict per level with ``feature_size``, ``window_size``, ``num_windows`` and
        ``global_pools``.

    Raises:
        ValueError: quoting the sizes, when the image is not a multiple of the total stride, a
            window does not divide its feature map, or the global query does not shrink exactly to
            the window.
    """
    height, width = _pair(image_size, "image_size")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels!r}")
    stride = 4 * 2 ** (num_levels - 1)
    if height % stride or width % stride or height <= 0 or width <= 0:
        raise ValueError(
            f"image size {(height, width)} must be a positive multiple of {stride} "
            f"(GCViT with {num_levels} levels reduces it {stride} times)"
        )
    if window_size is not None:
        per_level = (
            isinstance(window_size, Sequence)
            and len(window_size) == num_levels
            and not (num_levels != 2 and all(isinstance(w, (int, np.integer)) for w in window_size)
                     and len(window_size) == 2)
        )
        if isinstance(window_size, (int, np.integer)):
            windows = [_pair(window_size, "window_size")] * num_levels
        elif per_level:
            windows = [_pair(w, "window_size") for w in window_size]
        elif isinstance(window_size, Sequence) and len(window_size) == 2:
            windows = [_pair(window_size, "window_size")] * num_levels
        else:
            raise ValueError(
                f"window_size {window_size!r} must be an int, a pair, or one per level ({num_levels})"
            )
    else:
        if window_ratio is None:
            raise ValueError("give window_ratio or window_size")
        ratios = (
            [int(window_ratio)] * num_levels
            if isinstance(window_ratio, (int, np.integer))
            else list(window_ratio)
        )
        if len(ratios) != num_levels:
            raise ValueError(
                f"window_ratio {window_ratio!r} must have one entry per level ({num_levels})"
            )
        windows = [(height // r, width // r) for r in ratios]
    levels = []
    feat = (height // 4, width // 4)
    for i, win in enumerate(windows):
        if i:
            feat = (feat[0] // 2, feat[1] // 2)
        if window_size is not None:
            win = (min(win[0], feat[0]), min(win[1], feat[1]))
        if min(win) < 1 or feat[0] % win[0] or feat[1] % win[1]:
            raise ValueError(
                f"level {i}: feature map {feat} (image {(height, width)}) is not divisible by "
                f"window {win}; choose an image size for which image_size // window_ratio divides "
                f"the feature maps (e.g. 224, or multiples of 32 * 2 ** k) or pass window_size"
            )
        pools = int(math.log2(min(feat) / min(win)))
        pooled = feat
        for _ in range(pools):
            pooled = ((pooled[0] + 1) // 2, (pooled[1] + 1) // 2)
        if pooled != win:
            raise ValueError(
                f"level {i}: the global query of feature map {feat} pooled {pools} times is "
                f"{pooled}, not the window {win}; feature size / window must be a power of two"
            )
        levels.append(
            dict(
                feature_size=feat,
                window_size=win,
                num_windows=(feat[0] // win[0]) * (feat[1] // win[1]),
                global_pools=pools,
            )
        )
    return levels


def window_partition(x, window_size: tuple[int, int]):
    """``(B, H, W, C)`` -> ``(B, windows, wh * ww, C)``; windows in row-major order, like timm."""
    _, height, width, channels = x.shape
    wh, ww = window_size
    x = ops.reshape(x, (-1, height // wh, wh, width // ww, ww, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, (height // wh) * (width // ww), wh * ww, channels))


def window_reverse(x, window_size: tuple[int, int], feature_size: tuple[int, int]):
    """Inverse of :func:`window_partition`: ``(B, windows, wh * ww, C)`` -> ``(B, H, W, C)``."""
    height, width = feature_size
    wh, ww = window_size
    channels = x.shape[-1]
    x = ops.reshape(x, (-1, height // wh, width // ww, wh, ww, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, height, width, channels))


def relative_position_index(window_size: tuple[int, int]) -> np.ndarray:
    """Index into the ``(2wh-1)(2ww-1)`` bias table for each (query, key) pair of a window."""
    wh, ww = window_size
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1).astype("int32")


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PixelNormalization(keras.layers.Layer):
    """``(x * scale - mean) / std`` per channel; casts uint8 input to the compute dtype.

    Args:
        mean: per-channel mean (after ``scale``).
        std: per-channel standard deviation (after ``scale``).
        scale: factor applied first (1/255 maps uint8 pixels to [0, 1]).
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=1.0 / 255.0, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean {mean!r} and std {std!r} must match in length, std > 0")
        self.scale = float(scale)
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        factor = np.asarray([self.scale / s for s in self.std], dtype="float32")
        offset = np.asarray([-m / s for m, s in zip(self.mean, self.std)], dtype="float32")
        return x * ops.cast(factor, x.dtype) + ops.cast(offset, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mean=self.mean, std=self.std, scale=self.scale)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StochasticDepth(keras.layers.Layer):
    """Drop the whole residual branch per sample with probability ``rate`` while training."""

    def __init__(self, rate: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate!r}")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None
        self.built = True

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype)
        return x / keep * ops.floor(keep + noise)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SqueezeExcite(keras.layers.Layer):
    """Squeeze-and-excitation without biases, GELU inside (timm ``SEModule`` as GCViT uses it)."""

    def __init__(self, channels: int, reduced_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.reduced_channels = reduced_channels
        self.fc1 = keras.layers.Dense(reduced_channels, use_bias=False, name="fc1")
        self.fc2 = keras.layers.Dense(channels, use_bias=False, name="fc2")

    def build(self, input_shape):
        self.fc1.build((None, self.channels))
        self.fc2.build((None, self.reduced_channels))
        self.built = True

    def call(self, x):
        s = ops.mean(x, axis=(1, 2), keepdims=True)
        s = self.fc2(_gelu(self.fc1(s)))
        return x * ops.sigmoid(s)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, reduced_channels=self.reduced_channels)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MBConv(keras.layers.Layer):
    """Residual depthwise 3x3 -> GELU -> SE -> pointwise conv, no norms or biases (GCViT)."""

    def __init__(self, channels: int, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.conv_dw = keras.layers.DepthwiseConv2D(
            3, padding="same", use_bias=False, name="conv_dw"
        )
        self.se = SqueezeExcite(channels, make_divisible(channels * 0.25), name="se")
        self.conv_pw = keras.layers.Dense(channels, use_bias=False, name="conv_pw")

    def build(self, input_shape):
        shape = tuple(input_shape)
        self.conv_dw.build(shape)
        self.se.build(shape)
        self.conv_pw.build(shape)
        self.built = True

    def call(self, x):
        y = _gelu(self.conv_dw(x))
        y = self.conv_pw(self.se(y))
        return x + y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ReduceSize(keras.layers.Layer):
    """Downsample by two: LayerNorm -> MBConv -> conv 3x3 stride 2 (torch padding) -> LayerNorm."""

    def __init__(self, channels: int, out_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.out_channels = out_channels
        self.norm1 = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm1")
        self.conv = MBConv(channels, name="conv")
        self.reduction = keras.layers.Conv2D(
            out_channels, 3, strides=2, padding="valid", use_bias=False, name="reduction"
        )
        self.norm2 = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm2")

    def build(self, input_shape):
        batch, height, width, _ = input_shape
        self.norm1.build(input_shape)
        self.conv.build(input_shape)
        padded = (batch, None if height is None else height + 2,
                  None if width is None else width + 2, self.channels)
        self.reduction.build(padded)
        self.norm2.build(self.reduction.compute_output_shape(padded))
        self.built = True

    def call(self, x):
        x = self.conv(self.norm1(x))
        x = self.reduction(_pad_hw(x))
        return self.norm2(x)

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        half = [None if s is None else (s - 1) // 2 + 1 for s in (height, width)]
        return (batch, half[0], half[1], self.out_channels)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, out_channels=self.out_channels)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GlobalQueryGen(keras.layers.Layer):
    """Global query of a level: ``max(1, pools)`` MBConv steps, the first ``pools`` followed by a
    3x3/2 max-pool (torch padding, i.e. padded with -inf); output ``(B, wh * ww, C)``."""

    def __init__(self, channels: int, pools: int, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.pools = pools
        self.convs = [MBConv(channels, name=f"conv{i + 1}") for i in range(max(1, pools))]

    def build(self, input_shape):
        for conv in self.convs:
            conv.build(input_shape)  # spatial size does not matter to the weights
        self.built = True

    def call(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < self.pools:
                x = ops.max_pool(_pad_hw(x, float("-inf")), 3, strides=2, padding="valid")
        return ops.reshape(x, (-1, x.shape[1] * x.shape[2], self.channels))

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        for _ in range(self.pools):
            height, width = (height + 1) // 2, (width + 1) // 2
        return (batch, height * width, self.channels)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, pools=self.pools)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WindowAttention(keras.layers.Layer):
    """Multi-head self-attention inside windows with a relative position bias.

    Input ``(B, windows, tokens, C)``. With ``use_global`` the queries come from the image's global
    query ``(B, tokens, C)`` (broadcast over its windows) and only keys/values are projected.
    """

    def __init__(
        self, dim: int, num_heads: int, window_size, use_global: bool = False,
        qkv_bias: bool = True, **kwargs,
    ):
        super().__init__(**kwargs)
        if dim % num_heads:
            raise ValueError(f"dim {dim!r} is not divisible by num_heads {num_heads!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = _pair(window_size, "window_size")
        self.use_global = bool(use_global)
        self.qkv_bias = qkv_bias
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = keras.layers.Dense(
            dim * (2 if self.use_global else 3), use_bias=qkv_bias, name="qkv"
        )
        self.proj = keras.layers.Dense(dim, name="proj")
        self._index = relative_position_index(self.window_size).reshape(-1)

    def build(self, input_shape, q_global_shape=None):
        wh, ww = self.window_size
        self.relative_position_bias_table = self.add_weight(
            name="relative_position_bias_table",
            shape=((2 * wh - 1) * (2 * ww - 1), self.num_heads),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
        )
        self.qkv.build((None, self.dim))
        self.proj.build((None, self.dim))
        self.built = True

    def relative_bias(self):
        """The ``(heads, tokens, tokens)`` bias added to the attention logits."""
        tokens = self.window_size[0] * self.window_size[1]
        bias = ops.take(self.relative_position_bias_table, self._index, axis=0)
        bias = ops.reshape(bias, (tokens, tokens, self.num_heads))
        return ops.transpose(bias, (2, 0, 1))

    def call(self, x, q_global=None):
        _, windows, tokens, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        if self.use_global:
            if q_global is None:
                raise ValueError(f"{self.name}: global attention needs q_global")
            kv = ops.reshape(self.qkv(x), (-1, windows, tokens, 2, heads, head_dim))
            kv = ops.transpose(kv, (3, 0, 1, 4, 2, 5))
            k, v = kv[0], kv[1]
            q = ops.reshape(q_global, (-1, 1, tokens, heads, head_dim))
            q = ops.transpose(q, (0, 1, 3, 2, 4))  # (B, 1, heads, tokens, hd): broadcast
        else:
            qkv = ops.reshape(self.qkv(x), (-1, windows, tokens, 3, heads, head_dim))
            qkv = ops.transpose(qkv, (3, 0, 1, 4, 2, 5))
            q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * ops.cast(self.scale, q.dtype)
        attn = ops.matmul(q, ops.swapaxes(k, -1, -2))
        attn = attn + ops.cast(self.relative_bias(), attn.dtype)
        if attn.shape[-1] == 1:  # a one-token window (tiny inputs): softmax over one key is 1
            attn = ops.ones_like(attn)
        else:
            attn = ops.softmax(attn, axis=-1)
        y = ops.matmul(attn, v)  # (B, windows, heads, tokens, hd)
        y = ops.reshape(ops.transpose(y, (0, 1, 3, 2, 4)), (-1, windows, tokens, self.dim))
        return self.proj(y)

    def compute_output_shape(self, input_shape, q_global_shape=None):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim, num_heads=self.num_heads, window_size=self.window_size,
            use_global=self.use_global, qkv_bias=self.qkv_bias,
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GCViTBlock(keras.layers.Layer):
    """Pre-norm transformer block on windowed tokens ``(B, windows, tokens, C)``.

    ``x + drop(ls1 * attn(norm1(x), q_global))`` then ``x + drop(ls2 * mlp(norm2(x)))``.
    """

    def __init__(
        self, dim: int, num_heads: int, window_size, mlp_ratio: float = 3.0,
        use_global: bool = False, qkv_bias: bool = True, layer_scale: float | None = None,
        drop_path: float = 0.0, **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = _pair(window_size, "window_size")
        self.mlp_ratio = float(mlp_ratio)
        self.use_global = bool(use_global)
        self.qkv_bias = qkv_bias
        self.layer_scale = layer_scale
        self.drop_path = float(drop_path)
        self.norm1 = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm1")
        self.attn = WindowAttention(
            dim, num_heads, self.window_size, use_global=use_global, qkv_bias=qkv_bias,
            name="attn",
        )
        self.norm2 = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm2")
        self.fc1 = keras.layers.Dense(int(dim * mlp_ratio), name="fc1")
        self.fc2 = keras.layers.Dense(dim, name="fc2")
        self.drop = StochasticDepth(drop_path, name="drop_path")

    def build(self, input_shape, q_global_shape=None):
        self.norm1.build(input_shape)
        self.attn.build(input_shape)
        self.norm2.build(input_shape)
        self.fc1.build((None, self.dim))
        self.fc2.build((None, int(self.dim * self.mlp_ratio)))
        if self.layer_scale is not None:
            init = keras.initializers.Constant(self.layer_scale)
            self.gamma1 = self.add_weight(name="gamma1", shape=(self.dim,), initializer=init)
            self.gamma2 = self.add_weight(name="gamma2", shape=(self.dim,), initializer=init)
        self.built = True

    def call(self, x, q_global=None, training=None):
        y = self.attn(self.norm1(x), q_global)
        if self.layer_scale is not None:
            y = y * self.gamma1
        x = x + self.drop(y, training=training)
        y = self.fc2(_gelu(self.fc1(self.norm2(x))))
        if self.layer_scale is not None:
            y = y * self.gamma2
        return x + self.drop(y, training=training)

    def compute_output_shape(self, input_shape, q_global_shape=None):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim, num_heads=self.num_heads, window_size=self.window_size,
            mlp_ratio=self.mlp_ratio, use_global=self.use_global, qkv_bias=self.qkv_bias,
            layer_scale=self.layer_scale, drop_path=self.drop_path,
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GCViTLevel(keras.layers.Layer):
    """One GCViT level (NVlabs layout): global query, ``depth`` blocks alternating local and
    global attention, then a ReduceSize downsample (``dim -> 2 dim``) unless ``downsample`` is off.

    Args:
        dim: channels of the level.
        depth: number of blocks (odd ones use the global query).
        num_heads: attention heads.
        window_size: window ``(h, w)`` (int for square).
        global_pools: max-pool steps of the global query generator.
        downsample: end with a ReduceSize to ``2 * dim`` channels.
        mlp_ratio, qkv_bias, layer_scale: block settings.
        drop_path: one stochastic-depth rate per block (or one for all).
    """

    def __init__(
        self, dim: int, depth: int, num_heads: int, window_size, global_pools: int,
        downsample: bool = True, mlp_ratio: float = 3.0, qkv_bias: bool = True,
        layer_scale: float | None = None, drop_path: float | Sequence[float] = 0.0, **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim = dim
        self.depth = depth
        self.num_heads = num_heads
        self.window_size = _pair(window_size, "window_size")
        self.global_pools = global_pools
        self.downsample = bool(downsample)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = qkv_bias
        self.layer_scale = layer_scale
        rates = [float(drop_path)] * depth if np.isscalar(drop_path) else list(drop_path)
        if len(rates) != depth:
            raise ValueError(f"drop_path {drop_path!r} must have one rate per block ({depth})")
        self.drop_path = rates
        self.q_global_gen = GlobalQueryGen(dim, global_pools, name="q_global_gen")
        self.blocks = [
            GCViTBlock(
                dim, num_heads, self.window_size, mlp_ratio=mlp_ratio, use_global=i % 2 == 1,
                qkv_bias=qkv_bias, layer_scale=layer_scale, drop_path=rates[i],
                name=f"blocks_{i}",
            )
            for i in range(depth)
        ]
        self.reduce = ReduceSize(dim, 2 * dim, name="downsample") if self.downsample else None

    def build(self, input_shape):
        _, height, width, _ = input_shape
        wh, ww = self.window_size
        windowed = (None, (height // wh) * (width // ww), wh * ww, self.dim)
        self.q_global_gen.build(input_shape)
        for block in self.blocks:
            block.build(windowed)
        if self.reduce is not None:
            self.reduce.build(input_shape)
        self.built = True

    def call(self, x, training=None):
        feature_size = (x.shape[1], x.shape[2])
        q_global = self.q_global_gen(x)
        x = window_partition(x, self.window_size)
        for block in self.blocks:
            x = block(x, q_global, training=training)
        x = window_reverse(x, self.window_size, feature_size)
        if self.reduce is not None:
            x = self.reduce(x)
        return x

    def compute_output_shape(self, input_shape):
        if self.reduce is not None:
            return self.reduce.compute_output_shape(input_shape)
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim, depth=self.depth, num_heads=self.num_heads,
            window_size=self.window_size, global_pools=self.global_pools,
            downsample=self.downsample, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
            layer_scale=self.layer_scale, drop_path=self.drop_path,
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PatchEmbed(keras.layers.Layer):
    """Stem: conv 3x3 stride 2 (torch padding, with bias) then a ReduceSize keeping channels."""

    def __init__(self, in_channels: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.in_channels = in_channels
        self.dim = dim
        self.proj = keras.layers.Conv2D(dim, 3, strides=2, padding="valid", name="proj")
        self.conv_down = ReduceSize(dim, dim, name="conv_down")

    def build(self, input_shape):
        batch, height, width, _ = input_shape
        padded = (batch, height + 2, width + 2, self.in_channels)
        self.proj.build(padded)
        self.conv_down.build(self.proj.compute_output_shape(padded))
        self.built = True

    def call(self, x):
        return self.conv_down(self.proj(_pad_hw(x)))

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        half = [(s - 1) // 2 + 1 for s in (height, width)]
        return self.conv_down.compute_output_shape((batch, half[0], half[1], self.dim))

    def get_config(self):
        config = super().get_config()
        config.update(in_channels=self.in_channels, dim=self.dim)
        return config


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GCViT(keras.Model):
    """Global Context Vision Transformer backbone / classifier (functional Keras 3 model).

    Layers are named like NVIDIA's reference: ``patch_embed``, ``levels_0`` .. ``levels_{L-1}``
    (each but the last ends with its downsample), ``norm``, then ``pool`` and ``head`` when asked.
    Inputs are normalised RGB images (timm's data config: ImageNet mean/std after /255); use
    :class:`PixelNormalization` in front for raw pixels.

    Args:
        embed_dim: channels of the first level (doubles per level).
        depths: blocks per level.
        num_heads: attention heads per level.
        window_ratio: window = image size // ratio, per level (timm's default rule).
        window_size: explicit window per level (or one for all); overrides ``window_ratio``.
        mlp_ratio: MLP hidden size / dim.
        qkv_bias: bias in the qkv projections.
        layer_scale: initial layer-scale value, or None for no layer scale.
        drop_path_rate: stochastic depth, linearly increasing over all blocks up to this rate.
        image_size: input height and width (int or pair); windows are derived from it.
        in_channels: input channels.
        include_top: add global average pooling and a ``head`` Dense of ``num_classes``.
        num_classes: classes of the head.
        pooling: without top, ``None`` (feature map ``(B, h, w, C)``), ``"avg"`` or ``"max"``.
        classifier_activation: activation of the head (None: logits, like timm).
        weights: None, a path to a timm GCViT state dict (.safetensors/.pth/.bin) or
            ``"imagenet"`` (a local file found by :func:`keras_cspine.stage1.models.weights.resolve_weights`;
            never downloaded). NVIDIA's ImageNet weights are CC-BY-NC-SA-4.0.
        variant: the timm variant name used to resolve ``weights="imagenet"``.
        name: model name.

    Example:
    ```python
    model = gcvit_xxtiny(image_size=64, include_top=False, pooling="avg")
    features = model.predict(np.zeros((2, 64, 64, 3), "float32"))   # (2, 512)
    ```

    Reference: Hatamizadeh, Yin, Heinrich, Kautz, Molchanov, "Global Context Vision
    Transformers", ICML 2023 (arXiv 2206.09959).
    """

    def __init__(
        self,
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 19, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        window_ratio: Sequence[int] | int | None = (32, 32, 16, 32),
        window_size=None,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        drop_path_rate: float = 0.0,
        image_size=224,
        in_channels: int = 3,
        include_top: bool = True,
        num_classes: int = 1000,
        pooling: str | None = None,
        classifier_activation=None,
        weights: str | None = None,
        variant: str | None = None,
        name: str = "gcvit",
        **kwargs,
    ):
        # === validation ===
        depths = tuple(int(d) for d in depths)
        num_heads = tuple(int(h) for h in num_heads)
        if len(depths) != len(num_heads) or not depths or min(depths) < 1:
            raise ValueError(
                f"depths {depths!r} and num_heads {num_heads!r} must be non-empty, of equal "
                f"length, with at least one block per level"
            )
        if pooling not in (None, "avg", "max"):
            raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
        if include_top and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if embed_dim < 1 or any(embed_dim * 2**i % h for i, h in enumerate(num_heads)):
            raise ValueError(
                f"embed_dim {embed_dim!r} * 2**level must be divisible by num_heads {num_heads!r}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        image_size = _pair(image_size, "image_size")
        geometry = gcvit_geometry(image_size, len(depths), window_ratio, window_size)
        rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()

        # === layers ===
        patch_embed = PatchEmbed(in_channels, embed_dim, name="patch_embed")
        levels = []
        start = 0
        for i, (depth, heads, geo) in enumerate(zip(depths, num_heads, geometry)):
            levels.append(
                GCViTLevel(
                    embed_dim * 2**i, depth, heads, geo["window_size"], geo["global_pools"],
                    downsample=i < len(depths) - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    layer_scale=layer_scale, drop_path=rates[start:start + depth],
                    name=f"levels_{i}",
                )
            )
            start += depth
        norm = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="norm")

        # === functional model ===
        inputs = keras.Input(shape=(*image_size, in_channels), name="image")
        x = patch_embed(inputs)
        for level in levels:
            x = level(x)
        x = norm(x)
        if include_top or pooling == "avg":
            x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        elif pooling == "max":
            x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
        if include_top:
            x = keras.layers.Dense(
                num_classes, activation=classifier_activation, name="head"
            )(x)
        super().__init__(inputs=inputs, outputs=x, name=name, **kwargs)

        # === config ===
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.window_ratio = window_ratio
        self.window_size = window_size
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = qkv_bias
        self.layer_scale = layer_scale
        self.drop_path_rate = float(drop_path_rate)
        self.image_size = image_size
        self.in_channels = in_channels
        self.include_top = include_top
        self.num_classes = num_classes
        self.pooling = pooling
        self.classifier_activation = classifier_activation
        self.variant = variant
        self.geometry = geometry

        if weights is not None:
            load_gcvit_weights(self, weights, variant=variant)

    @property
    def level_names(self) -> tuple[str, ...]:
        """Names of the level layers, in order."""
        return tuple(f"levels_{i}" for i in range(len(self.depths)))

    def get_config(self):
        return {
            "embed_dim": self.embed_dim,
            "depths": list(self.depths),
            "num_heads": list(self.num_heads),
            "window_ratio": (
                None if self.window_ratio is None
                else self.window_ratio if isinstance(self.window_ratio, int)
                else list(self.window_ratio)
            ),
            "window_size": self.window_size,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "layer_scale": self.layer_scale,
            "drop_path_rate": self.drop_path_rate,
            "image_size": list(self.image_size),
            "in_channels": self.in_channels,
            "include_top": self.include_top,
            "num_classes": self.num_classes,
            "pooling": self.pooling,
            "classifier_activation": keras.activations.serialize(
                keras.activations.get(self.classifier_activation)
            ) if self.classifier_activation is not None else None,
            "variant": self.variant,
            "name": self.name,
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        trainable = config.pop("trainable", True)
        act = config.get("classifier_activation")
        if isinstance(act, dict):
            config["classifier_activation"] = keras.activations.deserialize(act)
        model = cls(**config)
        model.trainable = trainable
        return model


def build_gcvit(variant: str, **kwargs) -> GCViT:
    """Build a named GCViT variant (``gcvit_xxtiny``, ``gcvit_xtiny``, ``gcvit_tiny``,
    ``gcvit_small``, ``gcvit_base``); keyword arguments override the variant's settings."""
    if variant not in GCVIT_VARIANTS:
        raise ValueError(f"unknown GCViT variant {variant!r}; choose from {sorted(GCVIT_VARIANTS)}")
    settings = {**GCVIT_VARIANTS[variant], "name": variant, "variant": variant, **kwargs}
    return GCViT(**settings)


def gcvit_xxtiny(**kwargs) -> GCViT:
    """GCViT-xxtiny: dim 64, depths (2, 2, 6, 2), heads (2, 4, 8, 16), MLP ratio 3 (12.0M)."""
    return build_gcvit("gcvit_xxtiny", **kwargs)


def gcvit_xtiny(**kwargs) -> GCViT:
    """GCViT-xtiny: dim 64, depths (3, 4, 6, 5), heads (2, 4, 8, 16), MLP ratio 3 (20.0M)."""
    return build_gcvit("gcvit_xtiny", **kwargs)


def gcvit_tiny(**kwargs) -> GCViT:
    """GCViT-tiny, the paper's backbone: dim 64, depths (3, 4, 19, 5), heads (2, 4, 8, 16),
    MLP ratio 3 (28.2M with the ImageNet head)."""
    return build_gcvit("gcvit_tiny", **kwargs)


def gcvit_small(**kwargs) -> GCViT:
    """GCViT-small: dim 96, depths (3, 4, 19, 5), heads (3, 6, 12, 24), MLP ratio 2, layer
    scale 1e-5 (51.1M)."""
    return build_gcvit("gcvit_small", **kwargs)


def gcvit_base(**kwargs) -> GCViT:
    """GCViT-base: dim 128, depths (3, 4, 19, 5), heads (4, 8, 16, 32), MLP ratio 2, layer
    scale 1e-5 (90.3M)."""
    return build_gcvit("gcvit_base", **kwargs)


def _gcvit_backbone(variant: str):
    """The registry's builder of a GCViT variant: 0-255 images (normalised by the classifier) ->
    the feature map of its last level, without ImageNet head."""

    def build(image_size, weights=None, drop_path_rate: float = 0.0, **kwargs) -> GCViT:
        return build_gcvit(variant, image_size=image_size, include_top=False, pooling=None,
                           weights=weights, drop_path_rate=drop_path_rate, **kwargs)  # fmt: skip

    return build


register_model(ModelSpec(
    "gcvit_tiny", "image+metadata", "GCViT-tiny + metadata, the paper's model",
    paper="Proposed (GCViT)", backbone=_gcvit_backbone("gcvit_tiny"), default_freeze="levels_2",
    paper_parameters=PAPER_PARAMETERS["Proposed (GCViT)"], weights="gcvit_tiny",
))  # fmt: skip
register_model(ModelSpec("gcvit_xtiny", "image+metadata", "GCViT-xtiny + metadata",
                         backbone=_gcvit_backbone("gcvit_xtiny"), default_freeze="none"))  # fmt: skip
register_model(ModelSpec("gcvit_xxtiny", "image+metadata",
                         "GCViT-xxtiny + metadata (small, for CPU runs)",
                         backbone=_gcvit_backbone("gcvit_xxtiny"), default_freeze="none"))  # fmt: skip
for _variant in ("gcvit_small", "gcvit_base"):
    register_model(ModelSpec(_variant, "image+metadata", f"{_variant} + metadata",
                             backbone=_gcvit_backbone(_variant), default_freeze="none"))  # fmt: skip
