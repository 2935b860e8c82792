"""Parity of `models.clip.ClipVision` with `transformers` `CLIPVisionModel` /
`CLIPVisionModelWithProjection`, and `convert/clip_keys.py`.

A tiny random CLIPVisionModelWithProjection (every weight randomised: LayerNorms, class and
position embeddings included; float32, eager attention) and the CLIPVisionModel inside it are
saved with `save_pretrained`, converted from the saved files and compared on random images:
last_hidden_state, pooled output, image_embeds (LongVALE), every hidden state, the penultimate
layer's patch tokens (LongVA) and position interpolation; then both classes' round trips and an
export that `from_pretrained` loads.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

from convert import clip_keys
from longvid_jax.models import clip

TOL = 1e-4
HF_KW = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
             num_attention_heads=4, intermediate_size=64, projection_dim=16,
             layer_norm_eps=1e-5, hidden_act="quick_gelu", num_channels=3)
LONGVA_IGNORE = ("encoder.layers.2.", "post_layernorm.")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, .2^2), class and
    position embeddings ~ N(0, .5^2), other vectors ~ N(0, .1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "class_embedding" in name or "position" in name:
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.1 * noise)


def _save_and_read(model, folder) -> tuple[dict[str, np.ndarray], dict]:
    model.save_pretrained(folder)
    with open(f"{folder}/config.json") as f:
        return safetensors.numpy.load_file(f"{folder}/model.safetensors"), json.load(f)


@pytest.fixture(scope="module")
def hf_proj(tmp_path_factory):
    """(model, saved state dict, our config) of the CLIPVisionModelWithProjection."""
    config = CLIPVisionConfig(**HF_KW)
    config._attn_implementation = "eager"
    model = CLIPVisionModelWithProjection(config).eval()
    _randomise(model, 0)
    saved, cfg_json = _save_and_read(model, tmp_path_factory.mktemp("clip_proj"))
    return model, saved, clip_keys.config_from_hf(cfg_json)


@pytest.fixture(scope="module")
def hf_bare(hf_proj, tmp_path_factory):
    """The same weights as a CLIPVisionModel."""
    model = hf_proj[0].vision_model
    saved, cfg_json = _save_and_read(model, tmp_path_factory.mktemp("clip_bare"))
    return model, saved, clip_keys.config_from_hf(cfg_json)


def _images(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _hf(model, images, **kw):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)).contiguous(),
                     output_hidden_states=True, **kw)


def _ours(cfg, params, images, **kw):
    fn = jax.jit(lambda p, x: clip.ClipVision(cfg).apply({"params": p}, x, **kw))
    return fn(params, jnp.asarray(images))


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_configs_from_saved_configs(hf_proj, hf_bare):
    assert hf_proj[2] == clip.make_config("tiny", depth=3)
    assert hf_proj[2].projection_dim == 16 and hf_bare[2].projection_dim is None
    assert sorted(hf_bare[1]) == sorted(k.removeprefix("vision_model.") for k in hf_proj[1]
                                        if k.startswith("vision_model."))


def test_with_projection_outputs_and_hidden_states(hf_proj):
    """LongVALE: image_embeds; and last_hidden_state, pooler_output, hidden_states."""
    model, saved, cfg = hf_proj
    params = clip_keys.hf_to_params(saved, cfg)
    images = _images((2, 32, 32, 3))
    ref = _hf(model, images)
    out, aux = _ours(dataclasses.replace(cfg, keep_cls=True), params, images,
                     return_hidden_states=True)
    assert _err(out, ref.last_hidden_state) < TOL
    assert aux["image_embeds"].shape == (2, 16)
    assert _err(aux["image_embeds"], ref.image_embeds) < TOL
    assert aux["hidden_states"].shape[0] == len(ref.hidden_states) == 4
    for i, h in enumerate(ref.hidden_states):
        assert _err(aux["hidden_states"][i], h) < TOL, i


def test_bare_model_pooled_output(hf_bare):
    model, saved, cfg = hf_bare
    params = clip_keys.hf_to_params(saved, cfg)
    images = _images((2, 32, 32, 3), seed=2)
    ref = _hf(model, images)
    out, aux = _ours(cfg, params, images)
    assert out.shape == (2, 16, 32)
    assert _err(out, ref.last_hidden_state[:, 1:]) < TOL
    assert _err(aux["pooled"], ref.pooler_output) < TOL
    assert "image_embeds" not in aux


def test_longva_penultimate_layer_patch_tokens(hf_bare):
    """LongVA: `hidden_states[-2][:, 1:]` (last layer dropped, no post-LN, no projection)."""
    model, saved, cfg = hf_bare
    cfg = dataclasses.replace(cfg, drop_last_layers=1, post_ln=False)
    params = clip_keys.hf_to_params(saved, cfg, ignore=LONGVA_IGNORE)
    assert params["encoder"]["layers"]["q"]["kernel"].shape == (2, 32, 4, 8)
    images = _images((3, 32, 32, 3), seed=3)
    out, _ = _ours(cfg, params, images)
    assert out.shape == (3, 16, 32)
    assert _err(out, _hf(model, images).hidden_states[-2][:, 1:]) < TOL


def test_position_interpolation(hf_proj):
    """A 40x56 input (5x7 grid from the stored 4x4) as HF `interpolate_pos_encoding=True`."""
    model, saved, cfg = hf_proj
    params = clip_keys.hf_to_params(saved, cfg)
    images = _images((1, 40, 56, 3), seed=4)
    ref = _hf(model, images, interpolate_pos_encoding=True)
    out, aux = _ours(cfg, params, images)
    assert _err(out, ref.last_hidden_state[:, 1:]) < TOL
    assert _err(aux["image_embeds"], ref.image_embeds) < TOL


@pytest.mark.parametrize("which", ["with_projection", "bare", "full_clip_model_keys"])
def test_round_trip_is_bitwise(hf_proj, hf_bare, which):
    if which == "full_clip_model_keys":  # a CLIPModel checkpoint's vision keys: same as proj
        sd, cfg = hf_proj[1], hf_proj[2]
        text = {"text_model.final_layer_norm.weight": np.ones(8, np.float32),
                "text_projection.weight": np.ones((16, 8), np.float32),
                "logit_scale": np.ones((), np.float32)}
        params = clip_keys.hf_to_params({**sd, **text}, cfg, ignore=clip_keys.CLIP_TEXT_KEYS)
    else:
        _, sd, cfg = hf_proj if which == "with_projection" else hf_bare
        params = clip_keys.hf_to_params(sd, cfg)
    back = clip_keys.params_to_hf(params, cfg)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize("which", ["with_projection", "bare"])
def test_export_loads_with_from_pretrained(hf_proj, hf_bare, which, tmp_path):
    model, saved, cfg = hf_proj if which == "with_projection" else hf_bare
    cls = type(model)
    params = clip_keys.hf_to_params(saved, cfg)
    safetensors.numpy.save_file(clip_keys.params_to_hf(params, cfg),
                                str(tmp_path / "model.safetensors"))
    model.config.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    want = model.state_dict()
    assert sorted(loaded.state_dict()) == sorted(want)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_param_tree_matches_model_init(hf_proj):
    _, saved, cfg = hf_proj
    params = clip_keys.hf_to_params(saved, cfg)
    shapes = jax.eval_shape(lambda: clip.ClipVision(cfg).init(jax.random.key(0),
                                                              jnp.zeros((1, 32, 32, 3))))
    want = jax.tree.map(lambda a: a.shape, nn.meta.unbox(shapes)["params"])
    assert jax.tree.map(lambda a: a.shape, params) == want


def test_converter_is_strict(hf_proj, hf_bare):
    _, sd, cfg = hf_proj
    with pytest.raises(ValueError, match=r"missing key 'visual_projection\.weight'"):
        clip_keys.hf_to_params({k: v for k, v in sd.items() if "visual" not in k}, cfg)
    with pytest.raises(ValueError, match=r"unmapped key 'visual_projection\.weight'"):
        clip_keys.hf_to_params(sd, dataclasses.replace(cfg, projection_dim=None),
                               prefix="vision_model.")
    with pytest.raises(ValueError, match=r"unmapped key 'text_model\.x'"):
        clip_keys.hf_to_params({**sd, "text_model.x": np.zeros(2)}, cfg)
    _, bare, bare_cfg = hf_bare
    with pytest.raises(ValueError, match=r"layers\.2\..*only 2 layers"):
        clip_keys.hf_to_params(bare, dataclasses.replace(bare_cfg, drop_last_layers=1,
                                                         post_ln=False),
                               ignore=("post_layernorm.",))
    bad = {**bare, "embeddings.position_embedding.weight": np.zeros((16, 32), np.float32)}
    with pytest.raises(ValueError, match=r"position_embedding\.weight.*\(16, 32\).*\(17, 32\)"):
        clip_keys.hf_to_params(bad, bare_cfg)
    with pytest.raises(ValueError, match=r"post_ln"):
        clip.make_config("tiny", drop_last_layers=1)
    with pytest.raises(ValueError, match=r"projection_dim needs post_ln"):
        clip.make_config("tiny", post_ln=False)


def test_config_from_hf_full_clip_config_and_longva():
    full = CLIPConfig(projection_dim=768, vision_config=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=512)).to_dict()
    assert clip_keys.config_from_hf(full) == clip.make_config("l14_336")  # top-level 768
    longva = clip_keys.config_from_hf(full, with_projection=False, post_ln=False,
                                      drop_last_layers=1)
    assert (longva.projection_dim, longva.num_layers_run, longva.post_ln) == (None, 23, False)
    # A hub config.json lists only non-default fields.
    l14 = {"model_type": "clip", "projection_dim": 768, "vision_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
        "num_hidden_layers": 24, "patch_size": 14}}
    assert clip_keys.config_from_hf(l14) == clip.make_config("l14_224")
    vision = {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"],
              "projection_dim": 768, **l14["vision_config"]}
    assert clip_keys.config_from_hf(vision).projection_dim is None
    assert clip_keys.config_from_hf(vision, with_projection=True).projection_dim == 768
    with pytest.raises(ValueError, match="unsupported model_type 'siglip'"):
        clip_keys.config_from_hf({"model_type": "siglip", "vision_config": {}})
    with pytest.raises(ValueError, match="unsupported model_type 'clip_text_model'"):
        clip_keys.config_from_hf({"model_type": "clip_text_model"})


def test_l14_336_param_count_and_table_shapes_match_hf_meta_model():
    cfg = clip.make_config("l14_336")
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768))
    total = sum(p.numel() for p in model.parameters())
    shapes = jax.eval_shape(lambda: clip.ClipVision(cfg).init(jax.random.key(0),
                                                              jnp.zeros((1, 336, 336, 3))))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes))) == total
    table = clip_keys.rules(cfg)
    for k, v in model.state_dict().items():
        (rule,) = [r for r in table if r.regex.fullmatch(k)]
        assert rule.hf_shape == tuple(v.shape), k
