"""Flax Linen modules of longvid_jax: pure functions of (params, inputs).

The einsum alphabet. Every equation, jaxtyping annotation and shape comment under
`longvid_jax/models` uses these letters, and no letter means two things:

  B  batch                       F  frames (of one video)
  P  patches (tokens) per frame  Q  learned / supplied queries (Q-Former)
  A  audio frames or tokens      T  query / LLM tokens
  S  key / value tokens          D  model width
  E  encoder width (where two widths meet, e.g. a cross-attention's keys)
  N  query heads                 K  key / value heads
  G  query heads per kv head     H  head dim
  M  MLP hidden                  V  vocabulary
  C  input channels (pixels, mel bins)   L  layers (stacked by nn.scan)

Logical axis names. Parameters and activations use distinct names; the config maps them to
mesh axes (`config.sharding_rules`), and mesh axis names never appear in model code.
"""

# Parameter axes.
EMBED = "embed"  # D of any tower
MLP = "mlp"  # M
HEADS = "heads"  # N
KV_HEADS = "kv_heads"  # K
HEAD_DIM = "head_dim"  # H
VOCAB = "vocab"  # V
LAYERS = "layers"  # L (scan axis)
NORM = "norm"  # scales / biases of norms: always replicated
CONV = "conv"  # kernel taps and input channels of convolutions / patch embeddings

# Activation axes.
ACT_BATCH = "act_batch"
ACT_LEN = "act_len"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_VOCAB = "act_vocab"

ACT_BTD = (ACT_BATCH, ACT_LEN, ACT_EMBED)
