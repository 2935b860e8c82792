"""Audio encoders: the Whisper encoder (LongVALE's speech tower) here, and BEATs (TDC's and
LongVALE's audio tower), which lives in `longvid_jax.models.beats` and is re-exported here as
`BEATs`, `BEATsConfig` and the module `beats` (`beats.make_config("iter3_as2m")`).

Follows `transformers` `WhisperEncoder` (models/whisper/modeling_whisper.py) and Radford et al.
2022, "Robust Speech Recognition via Large-Scale Weak Supervision", section 2.2: two 1-D
convolutions with GELU (the second with stride 2: 100 mel frames/s -> 50 tokens/s), position
embeddings, pre-LN transformer blocks (`EncoderBlock` of `vit.py`, k projection without bias)
and a final LayerNorm.

Local einsum letter (besides the alphabet of `longvid_jax.models`): `u` is a convolution's
kernel tap.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from longvid_jax.models import ACT_BTD, CONV, EMBED, beats  # noqa: F401  (beats re-exported)
from longvid_jax.models.beats import BEATs, BEATsConfig  # noqa: F401  (re-exported)
from longvid_jax.models.layers import Einsum, LayerNorm, activation
from longvid_jax.models.vit import EncoderStack, config_from_variant

Dtype = Any


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """Sizes and options of a Whisper encoder.

    Attributes:
      num_mel_bins: mel channels C of the input (large-v3: 128, large-v2: 80).
      width: model width D (`d_model`, 1280).
      depth: layers (`encoder_layers`, 32).
      num_heads: attention heads N (20); head dim H = width // num_heads.
      mlp_dim: MLP hidden size M (`encoder_ffn_dim`, 5120).
      max_positions: rows of the position-embedding table (`max_source_positions`, 1500 =
        30 s at 50 tokens/s); the longest output this encoder produces.
      ln_eps: LayerNorm epsilon (PyTorch default 1e-5).
      act: activation of the convolutions and the MLP (`activation_function`, "gelu" = erf).
      attention_impl: `dot_product_attention` backend (`"xla"` or `"cudnn"`).
      remat: rematerialise each layer in the backward pass.
      dtype: compute dtype.
      param_dtype: storage dtype of the weights.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_mel_bins: int = 128
    max_positions: int = 1500
    ln_eps: float = 1e-5
    act: str = "gelu"
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if self.width % 2:
            raise ValueError(f"width {self.width} must be even (sinusoidal positions)")
        activation(self.act)  # raises ValueError if unknown


VARIANTS: dict[str, dict[str, Any]] = {
    # openai/whisper-large-v3 and -v2 encoders.
    "large_v3": dict(num_mel_bins=128, width=1280, depth=32, num_heads=20, mlp_dim=5120),
    "large_v2": dict(num_mel_bins=80, width=1280, depth=32, num_heads=20, mlp_dim=5120),
    "tiny": dict(num_mel_bins=16, width=32, depth=2, num_heads=4, mlp_dim=64, max_positions=64),
}


def make_config(variant: str | None = None, **overrides) -> WhisperEncoderConfig:
    """Builds a `WhisperEncoderConfig` from a named variant plus field overrides.

    Raises:
      ValueError: for an unknown variant or field, or an inconsistent config.
    """
    return config_from_variant(WhisperEncoderConfig, VARIANTS, variant, overrides)


def from_dict(d: dict[str, Any]) -> WhisperEncoderConfig:
    """`make_config(**d)`; `d` may hold a `variant` key."""
    return make_config(**dict(d))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's sinusoidal position table `float32[length, channels]`: [sin | cos] halves.

    Timescales are geometric from 1 to `max_timescale` over `channels // 2` steps (Whisper's
    `sinusoids`, which HF uses to initialise `embed_positions`).
    """
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _sinusoid_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(sinusoids(*shape), dtype)


def _conv_taps(x: Float[Array, "B A C"], stride: int) -> Float[Array, "B A u C"]:
    """im2col for a kernel-3, padding-1 convolution over A: [B, A_out, 3, C].

    A_out = (A + 2 - 3) // stride + 1, e.g. A for stride 1 and (A + 1) // 2 for stride 2.
    """
    a = x.shape[1]
    a_out = (a - 1) // stride + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
    taps = [xp[:, u:u + stride * (a_out - 1) + 1:stride] for u in range(3)]
    return jnp.stack(taps, axis=2)


class WhisperEncoder(nn.Module):
    """Whisper audio encoder (`transformers` `WhisperEncoder`).

    Parameters: `conv1` kernel (3, C, D) [None, CONV, EMBED], bias (D,); `conv2` kernel
    (3, D, D) [None, CONV, EMBED], bias (D,) (taps unnamed: a logical name may occur only once
    per array); `pos_embedding` (max_positions, D) [None, EMBED],
    initialised with `sinusoids` (HF keeps it frozen: freeze `pos_embedding` in the optimizer
    to do the same); `encoder/layers/*` (see `vit.EncoderStack`, k without bias); `ln_post`
    (scale, bias).
    """

    config: WhisperEncoderConfig

    @nn.compact
    def __call__(self, mel: Float[Array, "B C A"], *, return_hidden_states: bool = False
                 ) -> tuple[Float[Array, "B A D"], dict[str, jax.Array]]:
        """Encodes a log-mel spectrogram into audio tokens (50 per second).

        HF's `WhisperEncoder` only accepts exactly `2 * max_positions` frames (30 s); this one
        accepts any A_in up to that and adds the first A_out position embeddings, so 100 mel
        frames (1 s) give 50 tokens. The pretrained model only saw 30 s windows: pad to 3000
        frames (`WhisperFeatureExtractor`) to reproduce its features exactly.

        Args:
          mel: float[B, C, A_in] log-mel features (channels first, as HF), C =
            `config.num_mel_bins`, 100 frames per second. Cast to `config.dtype`.
          return_hidden_states: also return every layer's output in aux.

        Returns:
          tokens: [B, A_out, D] in `config.dtype` after the final LayerNorm, A_out =
            (A_in + 1) // 2 (= A_in // 2 for even A_in).
          aux: `"encoder_output"`: [B, A_out, D] before the final LayerNorm; with
            `return_hidden_states`, `"hidden_states"`: [L + 1, B, A_out, D], the embeddings
            (convolutions + positions) at 0 and layer i's output at i (as HF).

        Raises:
          ValueError: if C differs from `config.num_mel_bins` or A_out > `max_positions`.
        """
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        _, c, a_in = mel.shape
        d = cfg.width
        if c != cfg.num_mel_bins:
            raise ValueError(f"expected {cfg.num_mel_bins} mel bins, got mel {mel.shape}")
        a_out = (a_in + 1) // 2
        if a_in == 0 or a_out > cfg.max_positions:
            raise ValueError(f"mel length {a_in} gives {a_out} tokens, not in "
                             f"[1, max_positions={cfg.max_positions}]")
        act = activation(cfg.act)
        kw = dict(dtype=dtype, param_dtype=pdtype)

        x = jnp.swapaxes(mel, 1, 2).astype(dtype)  # [B, A_in, C]
        x = act(Einsum((3, c, d), (None, CONV, EMBED), bias_axes=(EMBED,), fan_in_axes=(0, 1),
                       name="conv1", **kw)("BAuC,uCD->BAD", _conv_taps(x, 1)))
        x = act(Einsum((3, d, d), (None, CONV, EMBED), bias_axes=(EMBED,), fan_in_axes=(0, 1),
                       name="conv2", **kw)("BAuC,uCD->BAD", _conv_taps(x, 2)))
        pos = self.param("pos_embedding",
                         nn.with_logical_partitioning(_sinusoid_init, (None, EMBED)),
                         (cfg.max_positions, d), pdtype)
        x = nn.with_logical_constraint(x + pos[:a_out].astype(dtype)[None], ACT_BTD)

        x0 = x
        x, hidden = EncoderStack(
            num_layers=cfg.depth, width=d, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
            act=cfg.act, ln_eps=cfg.ln_eps, k_bias=False, attention_impl=cfg.attention_impl,
            remat=cfg.remat, collect=return_hidden_states, name="encoder", **kw)(x)
        aux = {"encoder_output": x}
        if return_hidden_states:
            aux["hidden_states"] = jnp.concatenate([x0[None], hidden], axis=0)
        x = LayerNorm(eps=cfg.ln_eps, param_dtype=pdtype, name="ln_post")(x)
        return x, aux
