"""Shared leaf layers: the one parameterised matmul (`Einsum`), norms and activations.

Every weight carries logical axis names (see `longvid_jax.models`), so the same module runs on
one CPU or on a sharded mesh; `config.sharding_rules` decides where each axis goes.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from longvid_jax.models import NORM, lora

Dtype = Any
Initializer = Callable[..., jax.Array]


def fan_in_init(fan_in_axes: Sequence[int]) -> Initializer:
    """Normal(0, 1/sqrt(fan_in)) where fan_in is the product of `fan_in_axes` of the shape."""

    def init(key, shape, dtype=jnp.float32):
        fan_in = 1
        for a in fan_in_axes:
            fan_in *= shape[a]
        return jax.random.normal(key, shape, dtype) * (fan_in**-0.5)

    return init


class Einsum(nn.Module):
    """A weight of any shape applied with an explicit einsum equation, plus an optional bias.

    Weights keep their axes (e.g. a query projection is `(D, N, H)`, not `(D, N*H)`), so every
    axis gets a logical name. HF layouts are reshaped only in `convert/`.

    Attributes:
      shape: weight shape, e.g. `(D, N, H)`.
      axes: logical axis name per weight axis.
      bias_axes: logical names of the bias, which has the shape of the trailing
        `len(bias_axes)` weight axes; `None` for no bias.
      fan_in_axes: weight axes contracted by the equation (for the default init); default `(0,)`.
      dtype: compute dtype (inputs and weights are cast to it); `None` keeps the input's.
      param_dtype: storage dtype of the weights (float32 master weights by default).

    Inside a `lora.lora_context` whose targets match this module's path, the layer also holds
    a LoRA adapter (`lora_a`, `lora_b` beside `kernel`) and adds `(alpha/r) * B(A(dropout(x)))`
    to its output (see `longvid_jax.models.lora`); otherwise its parameters are exactly
    `kernel` (and `bias`).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    bias_axes: tuple[str | None, ...] | None = None
    fan_in_axes: tuple[int, ...] = (0,)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None

    def weights(self) -> tuple[jax.Array, jax.Array | None]:
        """Declares (first call) and returns the kernel and bias (or None) in `param_dtype`."""
        if len(self.axes) != len(self.shape):
            raise ValueError(f"{self.name}: axes {self.axes} do not match shape {self.shape}")
        init = self.kernel_init or fan_in_init(self.fan_in_axes)
        w = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape,
                       self.param_dtype)
        b = None
        if self.bias_axes is not None:
            bshape = self.shape[len(self.shape) - len(self.bias_axes):]
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 self.bias_axes),
                           bshape, self.param_dtype)
        return w, b

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w, b = self.weights()
        dtype = self.dtype or x.dtype
        y = jnp.einsum(eqn, x.astype(dtype), w.astype(dtype))
        if b is not None:
            y = y + b.astype(dtype)
        delta = lora.einsum_delta(self, eqn, x, shape=self.shape, axes=self.axes,
                                  fan_in_axes=self.fan_in_axes, dtype=dtype,
                                  param_dtype=self.param_dtype)
        if delta is not None:
            y = y + delta
        return y


class EinsumWeights(Einsum):
    """The parameters of an `Einsum` (same names, shapes and logical axes), returned rather
    than applied: `w, b = EinsumWeights(...)()`. For fusing several projections into one matmul
    (e.g. q / k / v) while keeping each one's parameters where the checkpoint has them.

    A LoRA adapter on this layer (see `Einsum`) is returned folded into the kernel,
    `kernel + (alpha/r) * A @ B`; LoRA dropout cannot act here (raises ValueError)."""

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        w, b = self.weights()
        delta = lora.kernel_delta(self, shape=self.shape, axes=self.axes,
                                  fan_in_axes=self.fan_in_axes, param_dtype=self.param_dtype)
        if delta is not None:
            w = (w.astype(jnp.float32) + delta).astype(w.dtype)
        return w, b


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32 (Qwen2 / Llama).

    `y = x / sqrt(mean(x^2) + eps) * scale`, cast back to the input dtype before the scale,
    as `transformers` `Qwen2RMSNorm` / `LlamaRMSNorm` do.
    """

    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * scale.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in float32 (ViT, BERT, Whisper).

    Attributes:
      eps: variance epsilon (SigLIP 1e-6, BERT 1e-12, Whisper 1e-5).
      use_bias: learn an offset.
    """

    eps: float = 1e-6
    use_bias: bool = True
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                           (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
                              (d,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(x.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the erf form (BERT, ViT `gelu`, Whisper)."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (SigLIP `gelu_pytorch_tanh`)."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Looks up an activation by its `transformers` name; raises ValueError if unknown."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
