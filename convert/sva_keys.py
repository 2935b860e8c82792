"""TDC's Cambrian SVA connector: checkpoint keys <-> `longvid_jax.models.sva.SVAConnector` params.

The keys live in TDC's `CambrianQwenForCausalLM` / `CambrianLlamaForCausalLM` state dict under
`model.` (the HF-style folder of a TDC release). With D = `width`, D_llm = `llm_width`, E_i the
tower widths, N heads of H = D / N, r_i the window sides; `{l}` a layer of the sampler:

  key (after the prefix) [shape]                   ours                               transform
  mm_projector.{0,2}.weight [D_llm, D / D_llm]     mm_projector/linear_{0,2}/kernel   linear
  mm_projector.{0,2}.bias [D_llm]                  mm_projector/linear_{0,2}/bias     copy
  mm_projector_aux_{i}.0.weight [D, E_i]           aux_proj_{i}/linear_0/kernel       linear
  mm_projector_aux_{i}.2.weight [D, D]             aux_proj_{i}/linear_2/kernel       linear
  mm_projector_aux_{i}.{0,2}.bias [D]              aux_proj_{i}/linear_{0,2}/bias     copy
  mm_projector_aux_{i}.3.weight / .bias [D]        aux_proj_{i}/norm/{scale,bias}     copy
  vision_query [1, D]                              vision_query [1, D]                copy
  image_newline [D_llm]                            image_newline                      copy
  vision_sampler_0.layers.{l}. + (ours under vision_sampler/layer_{l}/):
    proj_context.weight [D, D]                     proj_context/kernel [D, D]         linear
    proj_in.weight [D, 2D]                         proj_in/kernel [2D, D]             linear
    proj_out.linear_{1,2}.weight [D, D]            proj_out/linear_{1,2}/kernel       linear
    norm.weight / .bias [D]                        norm/{scale,bias}                  copy
    pos_embed_{i} [r_i^2, D] (only when r_i > 1)   pos_embed_{i}                      copy
    cross_attn.q_proj.0.weight / .bias [D]         cross_attn/q_norm/{scale,bias}     copy
    cross_attn.q_proj.1.weight [N*H, D]            cross_attn/q/kernel [D, N, H]      heads_in
    cross_attn.{k,v}_proj_{i}.0.weight / .bias [D] cross_attn/{k,v}_norm_{i}/...      copy
    cross_attn.{k,v}_proj_{i}.1.weight [N*H, D]    cross_attn/{k,v}_{i}/kernel        heads_in
    cross_attn.o_proj.weight [D, N*H]              cross_attn/o/kernel [N, H, D]      heads_out

`model.frame_seg` is NOT part of this table: it belongs to the TDC compressor
(`convert/qformer_keys.py`, `tdc_rules`), which also uses it as the frame separator. A caller
holding a whole TDC checkpoint routes keys with `sva_owns` / `qformer_keys.tdc_owns` first, or
passes `ignore=("model.frame_seg",)` when converting the connector alone. Only one query group
(`vision_sampler_0`, `num_query_group=1` as released) is supported.

Strictness comes from `convert.vit_keys` (unmapped, missing, duplicate keys and shape mismatches
raise ValueError naming the key); arrays keep their dtype.
"""

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from convert.vit_keys import Rule, params_to_state, state_to_params
from longvid_jax.models.sva import SVAConfig, make_config

DEFAULT_PREFIX = "model."

_OWNED = ("mm_projector.", "mm_projector_aux_", "vision_sampler_", "vision_query",
          "image_newline")


def sva_owns(key: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether a key of a whole TDC checkpoint belongs to this table (not `frame_seg`)."""
    if not key.startswith(prefix):
        return False
    rest = key[len(prefix):]
    return any(rest == o or (o[-1] in "._" and rest.startswith(o)) for o in _OWNED)


def rules(cfg: SVAConfig) -> list[Rule]:
    """The SVA key table for `cfg` (keys relative to the prefix)."""
    d, dl, n = cfg.width, cfg.llm_width, cfg.num_heads
    h = d // n
    table = [
        Rule("mm_projector.0.weight", ("mm_projector", "linear_0", "kernel"), "linear", (d, dl)),
        Rule("mm_projector.0.bias", ("mm_projector", "linear_0", "bias"), "copy", (dl,)),
        Rule("mm_projector.2.weight", ("mm_projector", "linear_2", "kernel"), "linear", (dl, dl)),
        Rule("mm_projector.2.bias", ("mm_projector", "linear_2", "bias"), "copy", (dl,)),
        Rule("vision_query", ("vision_query",), "copy", (1, d)),
        Rule("image_newline", ("image_newline",), "copy", (dl,)),
    ]
    for i, e in enumerate(cfg.tower_widths):
        src, ours = f"mm_projector_aux_{i}", f"aux_proj_{i}"
        table += [
            Rule(f"{src}.0.weight", (ours, "linear_0", "kernel"), "linear", (e, d)),
            Rule(f"{src}.0.bias", (ours, "linear_0", "bias"), "copy", (d,)),
            Rule(f"{src}.2.weight", (ours, "linear_2", "kernel"), "linear", (d, d)),
            Rule(f"{src}.2.bias", (ours, "linear_2", "bias"), "copy", (d,)),
            Rule(f"{src}.3.weight", (ours, "norm", "scale"), "copy", (d,)),
            Rule(f"{src}.3.bias", (ours, "norm", "bias"), "copy", (d,)),
        ]
    for layer in range(cfg.depth):
        src = f"vision_sampler_0.layers.{layer}."
        ours = ("vision_sampler", f"layer_{layer}")
        ca = ours + ("cross_attn",)
        table += [
            Rule(src + "proj_context.weight", ours + ("proj_context", "kernel"), "linear", (d, d)),
            Rule(src + "proj_in.weight", ours + ("proj_in", "kernel"), "linear", (2 * d, d)),
            Rule(src + "proj_out.linear_1.weight", ours + ("proj_out", "linear_1", "kernel"),
                 "linear", (d, d)),
            Rule(src + "proj_out.linear_2.weight", ours + ("proj_out", "linear_2", "kernel"),
                 "linear", (d, d)),
            Rule(src + "norm.weight", ours + ("norm", "scale"), "copy", (d,)),
            Rule(src + "norm.bias", ours + ("norm", "bias"), "copy", (d,)),
            Rule(src + "cross_attn.q_proj.0.weight", ca + ("q_norm", "scale"), "copy", (d,)),
            Rule(src + "cross_attn.q_proj.0.bias", ca + ("q_norm", "bias"), "copy", (d,)),
            Rule(src + "cross_attn.q_proj.1.weight", ca + ("q", "kernel"), "heads_in", (d, n, h)),
            Rule(src + "cross_attn.o_proj.weight", ca + ("o", "kernel"), "heads_out", (n, h, d)),
        ]
        for i, r in enumerate(cfg.window_sizes):
            if r > 1:
                table.append(Rule(src + f"pos_embed_{i}", ours + (f"pos_embed_{i}",), "copy",
                                  (r * r, d)))
            for kv in ("k", "v"):
                pre = src + f"cross_attn.{kv}_proj_{i}."
                table += [
                    Rule(pre + "0.weight", ca + (f"{kv}_norm_{i}", "scale"), "copy", (d,)),
                    Rule(pre + "0.bias", ca + (f"{kv}_norm_{i}", "bias"), "copy", (d,)),
                    Rule(pre + "1.weight", ca + (f"{kv}_{i}", "kernel"), "heads_in", (d, n, h)),
                ]
    return table


def hf_to_params(state: Mapping[str, Any] | Iterable[tuple[str, Any]], cfg: SVAConfig, *,
                 prefix: str = DEFAULT_PREFIX, ignore: tuple[str, ...] = ()) -> dict:
    """TDC checkpoint keys of the SVA connector -> `SVAConnector(cfg)` params (numpy, dtypes kept).

    Args:
      state: key -> tensor (numpy / torch / jax), or (key, tensor) pairs.
      cfg: the connector's config.
      prefix: key prefix (`model.` in a TDC checkpoint).
      ignore: full-key prefixes to skip explicitly (e.g. `("model.frame_seg",)`); each must
        match some key.

    Raises:
      ValueError: see `convert.vit_keys.state_to_params` (e.g. an unrouted `model.frame_seg`).
    """
    return state_to_params(state, rules(cfg), prefix=prefix, ignore=tuple(ignore),
                           num_layers=cfg.depth)


def params_to_hf(params: Mapping[str, Any], cfg: SVAConfig, *,
                 prefix: str = DEFAULT_PREFIX) -> dict[str, np.ndarray]:
    """`SVAConnector(cfg)` params -> TDC checkpoint keys (numpy); inverse of `hf_to_params`
    (no `frame_seg`).

    Raises:
      ValueError: see `convert.vit_keys.params_to_state`.
    """
    return params_to_state(params, rules(cfg), prefix=prefix, num_layers=cfg.depth)


def config_from_hf(hf_config: Mapping[str, Any], *,
                   tower_widths: tuple[int, ...] = (1152, 1536), **overrides) -> SVAConfig:
    """`SVAConfig` from a TDC `config.json` (`CambrianQwen/LlamaConfig` with
    `mm_projector_type == 'sva'`).

    Reads `vision_hidden_size`, `mm_vision_tower_aux_token_len_list`, `query_num_list`,
    `image_token_len`, `connector_depth` and `hidden_size`. The tower widths are not in the
    config (the towers are loaded from the hub: SigLIP-so400m 1152, DINOv2-giant 1536); pass
    them when they differ.

    Raises:
      ValueError: for a non-SVA config, several query groups, or non-square token counts.
    """
    c = hf_config
    if c.get("mm_projector_type", "sva") != "sva":
        raise ValueError(f"mm_projector_type {c.get('mm_projector_type')!r} is not 'sva'")
    queries = c.get("query_num_list", [576])
    if isinstance(queries, str):
        queries = [int(q) for q in queries.strip("[]").split(",")]
    if len(queries) != 1:
        raise ValueError(f"only one query group is supported, got query_num_list {queries}")

    def side(n: int, what: str) -> int:
        s = math.isqrt(int(n))
        if s * s != int(n):
            raise ValueError(f"{what} {n} is not a square")
        return s

    grids = tuple(side(n, "mm_vision_tower_aux_token_len_list entry")
                  for n in c["mm_vision_tower_aux_token_len_list"])
    kw = dict(tower_widths=tuple(tower_widths), tower_grids=grids,
              query_grid=side(queries[0], "query_num_list entry"),
              final_grid=side(c.get("image_token_len", queries[0]), "image_token_len"),
              width=c.get("vision_hidden_size", 1024), depth=c.get("connector_depth", 3),
              llm_width=c["hidden_size"])
    kw.update(overrides)
    return make_config(**kw)
