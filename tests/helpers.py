"""Helpers shared by several test files: random weights without an init compile, a tiny
checkpoint in the trainer's layout, a decoder LM under the composite's `llm` scope."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longvid_jax import checkpoints, infer
from longvid_jax.models import decoder, video_llm


def random_params(abstract, seed: int):
    """Random non-trivial arrays shaped like `abstract` (ShapeDtypeStructs): matrices
    N(0, 1/fan_in) (fan_in = the first axis), norm scales 1 + 0.1 N, the rest 0.1 N."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if x.ndim >= 2:
            return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[0]), x.dtype)
        if "scale" in jax.tree_util.keystr(path):
            return jnp.asarray(1 + 0.1 * rng.normal(size=x.shape), x.dtype)
        return jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def tiny_checkpoint(config, workdir, *, step: int, seed: int):
    """Random params of `config`'s model saved as the trainer does (`{"params", "opt_state",
    "step"}` under `<workdir>/checkpoints/<step>`); returns the params."""
    model_cfg = video_llm.make_config(config.model)
    params = random_params(infer.abstract_params(model_cfg, config.input), seed)
    ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(step, {"params": params, "opt_state": {"count": jnp.zeros((), jnp.int32)},
                     "step": jnp.asarray(step, jnp.int32)}, {}, force=True)
    ckpt.close()
    return params


class ScopedLM(nn.Module):
    """A decoder LM under the scope name `llm` (as in the composite; LoRA targets and
    converted trees use composite paths): tokens [B, T] -> float32 logits [B, T, V]."""

    cfg: decoder.DecoderConfig

    @nn.compact
    def __call__(self, tokens):
        m = decoder.Decoder(self.cfg, name="llm")
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, _ = m(m.embed(tokens), positions)
        return m.logits(hidden)
