"""Parity of the SVA connector with the original TDC module outputs (fixture tdc_sva_connector).

Reference: Hoar012/TDC-Video `tdc/vision_sampler.py` + the SVA path of `tdc/cambrian_arch.py`
(3 frames: square, landscape-as-read and portrait-as-read), random weights.
"""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert import qformer_keys, sva_keys
from longvid_jax.models import sva

TOL = 1e-4


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    d = fixtures_dir / "tdc_sva_connector"
    weights = load_file(str(d / "weights.safetensors"))
    io = dict(np.load(d / "io.npz"))
    meta = json.loads((d / "config.json").read_text())
    cfg = sva.make_config("tiny")
    params = sva_keys.hf_to_params(weights, cfg, ignore=("model.frame_seg",))
    model = sva.SVAConnector(cfg)
    run = jax.jit(lambda p, feats, sizes, pads: model.apply({"params": p}, feats, sizes,
                                                            pads=pads))
    return cfg, weights, io, meta, params, run


def test_fixture_config_matches_tiny_variant(fx):
    cfg, _, _, meta, _, _ = fx
    assert cfg.tower_widths == tuple(meta["tower_hidden_sizes"])
    assert [g * g for g in cfg.tower_grids] == meta["mm_vision_tower_aux_token_len_list"]
    assert [cfg.num_queries] == meta["query_num_list"] and cfg.final_grid ** 2 == meta[
        "image_token_len"]
    assert (cfg.width, cfg.llm_width, cfg.depth, cfg.num_heads, cfg.ln_eps) == (
        meta["vision_hidden_size"], meta["hidden_size_llm"], meta["connector_depth"],
        meta["num_heads_hardcoded"], meta["layernorm_eps"])
    assert list(cfg.window_sizes) == meta["cross_att_token_len_list"]
    assert cfg.swap_image_size_hw
    full = sva.make_config("tdc_qwen2_7b")
    assert (full.tower_widths, full.tower_grids, full.query_grid, full.width, full.num_heads,
            full.depth, full.llm_width) == ((1152, 1536), (24, 24), 12, 1024, 16, 3, 3584)


@pytest.mark.parametrize("pads_on_host", [False, True], ids=["image_sizes", "host_pads"])
def test_fixture_every_array(fx, pads_on_host):
    cfg, _, io, _, params, run = fx
    feats = [io["tower0_features"], io["tower1_features"]]
    sizes = io["image_sizes"].astype(np.int32)
    pads = sva.sva_pads(io["image_sizes"], cfg) if pads_on_host else None
    tokens, grid, aux = run(params, feats, sizes, pads)
    b, q = 3, cfg.num_queries
    for i in range(2):
        assert _err(aux[f"aux_proj_{i}"], io[f"aux_proj_{i}"]) <= TOL
        feat = np.asarray(aux[f"rearranged_feat_{i}"]).reshape(b * q, 4, cfg.width)
        assert _err(feat, io[f"rearranged_feat_{i}"]) <= TOL
        mask = np.asarray(aux[f"rearranged_mask_{i}"]).reshape(b * q, 4)
        np.testing.assert_array_equal(mask, io[f"rearranged_mask_{i}"])
    assert not io["rearranged_mask_0"].all()  # frames 1 and 2 have masked keys
    assert _err(aux["global_context"], io["global_context"]) <= TOL
    assert _err(aux["sampler_out"], io["sampler_out"]) <= TOL
    assert _err(tokens, io["mm_projector_out"]) <= TOL
    np.testing.assert_array_equal(np.asarray(grid), [[3, 3], [1, 3], [3, 1]])

    out, mask = jax.jit(sva.newline_layout)(tokens, grid, aux["image_newline"])
    assert out.shape == (3, 12, 48)
    np.testing.assert_array_equal(sva.num_frame_tokens(np.asarray(grid)), [12, 4, 6])
    for f in range(3):
        ref = io[f"final_tokens_frame{f}"]
        n = ref.shape[0]
        np.testing.assert_array_equal(np.asarray(mask[f]), np.arange(12) < n)
        assert _err(out[f, :n], ref) <= TOL, f
        assert float(np.abs(np.asarray(out[f, n:])).max(initial=0.0)) == 0.0


def test_swap_flag_reads_sizes_as_height_width(fx):
    """The quirk: with `swap_image_size_hw=False` the same frames given as (height, width) (the
    pairs reversed) get exactly the original's pads, in-graph and on the host; the connector
    reads nothing else of the sizes."""
    cfg, _, io, _, _, _ = fx
    plain = sva.make_config("tiny", swap_image_size_hw=False)
    sizes = io["image_sizes"].astype(np.int32)
    np.testing.assert_array_equal(sva.sva_pads(sizes, cfg), sva.sva_pads(sizes[:, ::-1], plain))
    for g in (3, 6):
        np.testing.assert_array_equal(
            np.asarray(sva.frame_pads(sizes, g)),
            np.asarray(sva.frame_pads(sizes[:, ::-1], g, swap_image_size_hw=False)))
    # Read without the quirk, the landscape frame (640 wide) loses rows instead of columns.
    np.testing.assert_array_equal(sva.sva_pads(sizes, plain)[:, -1], [[0, 0], [0, 1], [1, 0]])


def test_keys_round_trip_bitwise(fx):
    cfg, weights, _, _, params, _ = fx
    back = sva_keys.params_to_hf(params, cfg)
    assert set(back) == set(weights) - {"model.frame_seg"}
    assert len(back) == 66
    for k, v in back.items():
        assert v.dtype == weights[k].dtype, k
        np.testing.assert_array_equal(v, weights[k], err_msg=k)
    # Routing a whole TDC checkpoint: every key belongs to exactly one table.
    for k in weights:
        owners = sva_keys.sva_owns(k) + qformer_keys.tdc_owns(k)
        assert owners == 1, k
    assert qformer_keys.tdc_owns("model.frame_seg") and not sva_keys.sva_owns("model.frame_seg")
    assert not sva_keys.sva_owns("model.mm_projector_auxiliary.0.weight")
    assert not sva_keys.sva_owns("model.layers.0.mlp.up_proj.weight")


def test_keys_strict(fx):
    cfg, weights, _, _, _, _ = fx
    with pytest.raises(ValueError, match="model.frame_seg"):
        sva_keys.hf_to_params(weights, cfg)  # frame_seg belongs to the compressor table
    w = {k: v for k, v in weights.items() if k != "model.frame_seg"}
    bad = dict(w)
    del bad["model.vision_sampler_0.layers.1.pos_embed_1"]
    with pytest.raises(ValueError, match="pos_embed_1"):
        sva_keys.hf_to_params(bad, cfg)
    bad = dict(w)
    bad["model.vision_sampler_0.layers.0.cross_attn.o_proj.weight"] = np.zeros((64, 32))
    with pytest.raises(ValueError, match="o_proj"):
        sva_keys.hf_to_params(bad, cfg)
    bad = dict(w)
    bad["model.vision_sampler_0.layers.2.norm.weight"] = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="layers.2.norm"):
        sva_keys.hf_to_params(bad, cfg)
    with pytest.raises(ValueError, match="duplicate"):
        sva_keys.hf_to_params(list(w.items()) + [("model.vision_query", w["model.vision_query"])],
                              cfg)
    # Stage-1 sizes (query grid = tower grid): windows of one token, no pos_embed rows.
    stage1 = sva.make_config("tiny", query_grid=6)
    assert not any("pos_embed" in r.hf for r in sva_keys.rules(stage1))


def test_config_from_hf():
    tdc = {"mm_projector_type": "sva", "vision_hidden_size": 1024, "hidden_size": 3584,
           "mm_vision_tower_aux_token_len_list": [576, 576], "query_num_list": [144],
           "image_token_len": 144, "connector_depth": 3}
    cfg = sva_keys.config_from_hf(tdc)
    assert cfg == sva.make_config("tdc_qwen2_7b")
    assert sva_keys.config_from_hf({**tdc, "query_num_list": "[576]", "image_token_len": 576}
                                   ).window_sizes == (1, 1)
    with pytest.raises(ValueError, match="one query group"):
        sva_keys.config_from_hf({**tdc, "query_num_list": [144, 36]})
    with pytest.raises(ValueError, match="not 'sva'"):
        sva_keys.config_from_hf({**tdc, "mm_projector_type": "mlp2x_gelu"})
