"""The three TDC training stages (configs/tdc.py:stage=1|2|3) train at demo size on CPU with
exactly their trainable parameters moving."""

import importlib.util
import io
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from longvid_jax import infer, model_families, optim, train
from longvid_jax.models import lora, tdc

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
ONE = jax.devices()[:1]


def _config(stage: int, tmp_path, extra: str = ""):
    spec = importlib.util.spec_from_file_location("tdc_config", REPO / "configs" / "tdc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(f"stage={stage}{extra}")
    records = [("cockatoo.mp4", "What animal is this?", "A white cockatoo."),
               ("realshort.mp4", "Describe the video.", "A window sill with plants.")]
    ann = tmp_path / "train.jsonl"
    ann.write_text("".join(json.dumps({"video": v, "conversations": [
        {"from": "human", "value": "<video>\n" + q}, {"from": "gpt", "value": a}]}) + "\n"
        for v, q, a in records))
    c.input.annotations = str(ann)
    c.input.video_root = str(SAMPLES)
    c.input.num_workers = 0
    c.input.batch_size = 1
    c.input.shuffle = False
    c.input.max_frames = min(c.input.max_frames, 8)
    c.input.length_buckets = (128, 256)  # every record fits 128 tokens: a smaller vocab matmul
    c.total_steps = 2  # warmup rounds to 0 steps: both steps move the weights
    c.ckpt_every = 2
    c.log_every = 1
    return c


# Fewer Q-Former and LLM layers than the demo (same structure, faster compiles).
_QFORMER_DEPTH, _LLM_LAYERS = 2, 1
# Trainable leaves whose gradient is exactly zero: the Q-Former's last layer's text MLP feeds
# nothing (only the query outputs leave the Q-Former), so Adam leaves it in place.
_DEAD = re.compile(rf"compressor/qformer/layer_{_QFORMER_DEPTH - 1}/text_mlp/.*")


def _train_capturing_init(c, workdir):
    """(initial params, params after training, metrics) of `train.run(c, workdir)`.

    The initial params are copied from inside `train.run` (its `init_state`), so a run
    compiles one init and one train step; XLA optimisations are off meanwhile (compile time
    dominates these runs)."""
    captured = {}
    original = train.Trainer.init_state

    def init_state(self, seed):
        state = original(self, seed)
        captured["params"] = jax.tree.map(lambda x: np.array(x, copy=True), state["params"])
        return state

    optimizations_off = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train.Trainer, "init_state", init_state)
            final = train.run(c, str(workdir), devices=ONE)
    finally:
        jax.config.update("jax_disable_most_optimizations", optimizations_off)
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return captured["params"], jax.tree.map(np.asarray, final["params"]), metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """stage -> (config, initial params, params after 2 steps, metrics)."""
    out = {}
    for stage in (1, 2, 3):
        tmp = tmp_path_factory.mktemp(f"stage{stage}")
        c = _config(stage, tmp, ",model=simplified")
        c.model.qformer.depth = _QFORMER_DEPTH
        c.model.llm.num_layers = _LLM_LAYERS
        out[stage] = (c, *_train_capturing_init(c, tmp / "wd"))
    return out


def _changed(init, final) -> dict[str, bool]:
    flat_i = {optim.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(init)}
    flat_f = {optim.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(final)}
    assert flat_i.keys() == flat_f.keys()
    return {k: not np.array_equal(flat_i[k], flat_f[k]) for k in flat_i}


def _check_moved_exactly_trainable(c, init, final, what: str):
    """Asserts that every parameter `c.optim.frozen` freezes kept its value and every other
    one moved (but `_DEAD`); returns ({path: moved}, {path: frozen})."""
    changed = _changed(init, final)
    frozen = {optim.path_str(p): f for p, f in jax.tree_util.tree_leaves_with_path(
        optim.frozen_mask(init, c.optim.frozen))}
    for path, moved in changed.items():
        if frozen[path]:
            assert not moved, f"{what}: frozen {path} changed"
        elif not _DEAD.fullmatch(path):
            assert moved, f"{what}: trainable {path} did not change"
    return changed, frozen


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_trains_exactly_its_trainable_set(runs, stage):
    c, init, final, metrics = runs[stage]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    changed, frozen = _check_moved_exactly_trainable(c, init, final, f"stage {stage}")

    trainable = {p for p, f in frozen.items() if not f}
    n_adapters = lora.lora_param_count(init)
    if stage == 1:
        # LLM + projector; towers and the (not yet created in TDC) compressor frozen.
        assert {p.split("/")[0] for p in trainable} == {"llm", "projector"}
        assert "audio_encoder" not in init and n_adapters == 0
        assert c.model.vision_pool is None and c.input.max_frames == 1
    elif stage == 2:
        assert {p.split("/")[0] for p in trainable} == {"llm", "projector", "compressor"}
        assert "audio_encoder" not in init and n_adapters == 0
    else:
        assert n_adapters > 0 and c.lora.rank == 4 and c.lora.dropout == 0.05
        outside = {p for p in trainable if not re.fullmatch(
            r".*/lora_[ab]|compressor/(qformer/.*|frame_seg|audio_proj/.*)", p)}
        assert not outside, outside
        assert changed["llm/layers_0/self_attn/q_proj/lora_a"]
        assert changed["llm/layers_0/mlp/down_proj/lora_b"]
        assert not changed["llm/layers_0/self_attn/q_proj/kernel"]
        assert not changed["llm/embed_tokens/embedding"]
        assert changed["compressor/audio_proj/kernel"] and changed["compressor/frame_seg"]
        assert changed["compressor/qformer/layer_0/self_attn/query/kernel"]
        # The merged export has the tree of a model without adapters.
        merged = lora.merge_lora(final, c.lora)
        assert lora.lora_param_count(merged) == 0
        assert "lora_a" not in merged["llm"]["layers_0"]["self_attn"]["q_proj"]


def test_stage_configs_follow_the_original_recipes():
    spec = importlib.util.spec_from_file_location("tdc_config", REPO / "configs" / "tdc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    full = {s: module.get_config(f"stage={s},size=full,model=simplified") for s in (1, 2, 3)}
    assert [full[s].optim.lr for s in (1, 2, 3)] == [1e-5, 5e-6, 2e-5]
    assert module.get_config("stage=2,size=full,llm=llama3_2_3b,model=simplified"
                             ).optim.lr == 2e-5
    # A named stage trains TDC as released unless model=simplified is asked for; the demo
    # (no stage) keeps the simplified model.
    assert module.get_config("stage=2").model.name == "tdc"
    assert "name" not in module.get_config().model
    assert [full[s].model.vision_pool for s in (1, 2, 3)] == [(24, 24), (12, 12), (12, 12)]
    assert [(full[s].input.batch_size, full[s].grad_accum_steps) for s in (1, 2, 3)] == [
        (64, 2), (16, 2), (8, 1)]
    for s in (1, 2, 3):
        assert max(full[s].input.length_buckets) == 8192
        assert full[s].optim.warmup_ratio == 0.03 and full[s].optim.weight_decay == 0.0
    assert (full[3].lora.rank, full[3].lora.alpha, full[3].lora.dropout) == (128, 256.0, 0.05)
    assert full[1].lora.rank == full[2].lora.rank == 0
    assert full[1].model.audio is None and full[2].model.audio is None
    assert full[3].model.audio is not None
    with pytest.raises(ValueError, match="stage"):
        module.get_config("stage=4")


def test_faithful_tdc_stage2_trains_with_towers_frozen(tmp_path):
    """configs/tdc.py:stage=2,model=tdc: TDC as released (two towers, SVA connector, in-graph
    scene split, compressor) trains two steps on the sample clips; SigLIP and DINOv2 stay
    put, every connector / compressor / LLM leaf moves."""
    c = _config(2, tmp_path, ",model=tdc")
    assert c.model.name == "tdc" and c.input.tower_views[0][0] == "dino_frames"
    c.model.compressor.qformer.depth = _QFORMER_DEPTH
    c.model.llm.num_layers = _LLM_LAYERS
    # At most 2 boundaries: 8 frames form <= 3 segments whose non-first frames go through the
    # Q-Former (with 24, a video of <= 25 frames makes every frame a static segment).
    c.model.max_num_segments = 2
    init, final, metrics = _train_capturing_init(c, tmp_path / "wd")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["target_tokens"] > 0 for m in metrics)
    assert set(init) == {"siglip", "dinov2", "connector", "compressor", "llm"}
    changed = _changed(init, final)
    for path, moved in changed.items():
        if path.split("/")[0] in ("siglip", "dinov2"):
            assert not moved, f"frozen {path} changed"
        elif not _DEAD.fullmatch(path):
            assert moved, f"trainable {path} did not change"
    assert any(p.startswith("connector/") and "pos_embed" in p for p in changed)

    # The trained checkpoint answers through `python -m longvid_jax.infer --config=...` (the
    # TDC predictor: host scene split, KV-cache generation), streaming its text.
    stream, log = io.StringIO(), io.StringIO()
    out = infer.run(c, str(tmp_path / "wd"), video=str(SAMPLES / "cockatoo.mp4"),
                    question="What animal is this?", max_new_tokens=3, top_k=5,
                    temperature=0.7, stream=stream, log=log)
    assert len(out) == 1 and 1 <= len(out[0]["tokens"]) <= 3
    assert stream.getvalue() == out[0]["answer"] + "\n"
    assert "[load]" in log.getvalue() and "[compress]" in log.getvalue()


def test_faithful_tdc_config():
    spec = importlib.util.spec_from_file_location("tdc_config", REPO / "configs" / "tdc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("stage=2,size=full,model=tdc,bert_vocab=/b/vocab.txt")
    assert c.model.name == "tdc" and c.model.llm.hidden_size == 3584
    assert c.model.siglip.image_size == 384 and c.input.tower_views[0][1] == 378
    assert c.model.compressor.num_tokens == 16 and c.model.max_num_segments == 24
    assert c.input.qformer_tokenizer == "/b/vocab.txt" and c.input.max_frames == 224
    assert c.optim.frozen == ("siglip/.*", "dinov2/.*") and c.optim.lr == 5e-6
    assert c.model.beats is None and c.model.compressor.audio_width == 0
    with pytest.raises(ValueError, match="bert_vocab"):
        module.get_config("stage=2,size=full,model=tdc")

    # Stage 1 (scripts/stage1, LongVU_*_img): 576 queries, 24 x 25 tokens per square image,
    # no compressor (no BERT vocabulary needed), towers frozen, LR 1e-5, batch 4 x 2 x 8.
    s1 = module.get_config("stage=1,size=full,model=tdc")
    assert s1.model.compressor is None and s1.model.connector.query_grid == 24
    assert tdc.reserved_video_slots(1, model_families.from_config(s1.model).config) == 600
    assert (s1.optim.lr, s1.input.batch_size, s1.grad_accum_steps) == (1e-5, 64, 2)
    assert s1.optim.frozen == ("siglip/.*", "dinov2/.*") and s1.input.max_frames == 1
    assert max(s1.input.length_buckets) == 8192 and s1.input.qformer_text_len == 0

    # Stage 3 (scripts/stage3): BEATs audio, LoRA r=128 / alpha 256 / dropout 0.05, LR 2e-5,
    # batch 1 x 1 x 8, 224 frames (uniform_sample's int(i * n / 224)): the audio of 224 s in
    # 23 windows, 50 audio tokens on each static frame in the reserved slots.
    s3 = module.get_config("stage=3,size=full,model=tdc,bert_vocab=/b/vocab.txt")
    assert s3.model.beats.width == s3.model.compressor.audio_width == 768
    assert s3.model.beats.num_classes == 527  # BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2
    assert (s3.lora.rank, s3.lora.alpha, s3.lora.dropout) == (128, 256.0, 0.05)
    assert s3.lora.targets == lora.TDC_TARGETS
    assert (s3.optim.lr, s3.input.batch_size, s3.grad_accum_steps) == (2e-5, 8, 1)
    assert s3.input.max_frames == 224 and s3.input.beats_windows == 23
    assert s3.input.frame_subsample == "floor"
    assert s3.input.num_mel_bins == 0 and s3.input.beats_patch == 16
    assert s3.input.max_frame_context == c.input.max_frame_context == 8192  # // 38, // 32
    family = model_families.from_config(s3.model)
    with_audio = tdc.reserved_video_slots(9, family.config)
    assert with_audio == 9 * (family.config.frame_slots + 50 + 1)  # every frame static
    frozen = re.compile(s3.optim.frozen[0])
    for path in ("siglip/x", "dinov2/x", "beats/x", "llm/layers/mlp/up_proj/kernel",
                 "connector/mm_projector/linear_0/kernel", "compressor/vision_proj/kernel",
                 "connector/vision_sampler/layer_0/cross_attn/o/kernel"):
        assert frozen.fullmatch(path), path
    for path in ("llm/layers/mlp/up_proj/lora_a", "compressor/qformer/layer_3/wi/kernel",
                 "compressor/frame_seg", "compressor/audio_proj/kernel",
                 "connector/vision_sampler/layer_2/pos_embed_1",
                 "connector/vision_sampler/layer_2/cross_attn/o/lora_b"):
        assert not frozen.fullmatch(path), path


def test_faithful_tdc_stage3_trains_adapters_and_listed_modules_with_audio(tmp_path):
    """configs/tdc.py:stage=3,model=tdc: TDC as released with BEATs audio in the step (the
    pipeline's 10 s fbank windows through the frozen BEATs, pooled per frame in-graph) trains
    two steps on the sample clips (they have sound); exactly the LoRA adapters, the Q-Former,
    `frame_seg`, the SVA `pos_embed_*` and `audio_proj` move, nothing else."""
    c = _config(3, tmp_path, ",model=tdc")
    assert c.model.name == "tdc" and c.model.beats is not None
    assert c.input.beats_windows == 2 and c.input.num_mel_bins == 0  # 16 demo frames: 2 x 10 s
    # Two clips of more than 3 frames: with at most 2 scene boundaries each has frames that
    # go through the Q-Former, so its adapters (zero B at step 1) get a gradient at step 2.
    ann = tmp_path / "av.jsonl"
    ann.write_text("".join(json.dumps({"video": v, "conversations": [
        {"from": "human", "value": "<video>\n" + q}, {"from": "gpt", "value": a}]}) + "\n"
        for v, q, a in [("cockatoo.mp4", "What do you hear?", "Nothing, it is silent."),
                        ("movie-hello.mp4", "Who speaks?", "A man with a headset.")]))
    c.input.annotations = str(ann)
    c.input.max_frames = 6
    c.model.compressor.qformer.depth = _QFORMER_DEPTH
    c.model.llm.num_layers = _LLM_LAYERS
    for part in ("connector", "beats", "siglip", "dinov2"):  # one layer each: compile time
        c.model[part].depth = 1
    c.model.max_num_segments = 2
    init, final, metrics = _train_capturing_init(c, tmp_path / "wd")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["target_tokens"] > 0 for m in metrics)
    assert set(init) == {"siglip", "dinov2", "connector", "compressor", "llm", "beats"}
    changed, frozen = _check_moved_exactly_trainable(c, init, final, "stage 3, model=tdc")
    trainable = {p for p, f in frozen.items() if not f}
    outside = {p for p in trainable if not re.fullmatch(
        r".*/lora_[ab]|compressor/(qformer/.*|frame_seg|audio_proj/.*)"
        r"|connector/vision_sampler/layer_[0-9]+/pos_embed_[0-9]+", p)}
    assert not outside, outside
    assert {p.split("/")[0] for p in trainable} == {"llm", "compressor", "connector"}
    for path in ("llm/layers_0/self_attn/q_proj/lora_a", "llm/layers_0/mlp/down_proj/lora_b",
                 "compressor/vision_proj/lora_b", "compressor/query_proj/lora_a",
                 "connector/vision_sampler/layer_0/cross_attn/o/lora_b",
                 "connector/vision_sampler/layer_0/pos_embed_1",
                 "compressor/audio_proj/kernel", "compressor/frame_seg",
                 "compressor/qformer/layer_0/cross_attn/key/kernel"):
        assert changed[path], path
    for path in ("llm/layers_0/self_attn/q_proj/kernel", "compressor/vision_proj/kernel",
                 "connector/vision_sampler/layer_0/cross_attn/o/kernel"):
        assert frozen[path] and not changed[path], path
    assert lora.lora_param_count(init) > 0 and c.lora.rank == 4

    # The checkpoint restores for inference (`infer.make_predictor`) with its adapters merged.
    pred = infer.make_predictor(c, str(tmp_path / "wd"), log=io.StringIO())
    assert lora.lora_param_count(pred.params) == 0 and pred.config.beats is not None
    merged = lora.merge_lora(final, c.lora)
    for part in ("llm", "connector"):
        np.testing.assert_allclose(
            np.asarray(jax.tree.leaves(pred.params[part])[0]),
            np.asarray(jax.tree.leaves(merged[part])[0]), rtol=1e-6)
    q = pred.params["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert not np.allclose(q, init["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"])


def test_faithful_tdc_stage1_trains_all_but_the_towers_on_single_images(tmp_path):
    """configs/tdc.py:stage=1,model=tdc: the LongVU image model (one SVA query per tower cell,
    so no `pos_embed`; `image_newline` per row; no compressor) trains two steps on LLaVA
    single-image records (a JPEG and a PNG, `"image"` keys, `<image>` tags); SigLIP / DINOv2
    stay put, every connector and LLM leaf moves."""
    import PIL.Image

    from longvid_jax.input import decode

    c = _config(1, tmp_path, ",model=tdc")
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for video, name, q, a in (("cockatoo.mp4", "bird.jpg", "What animal is this?", "A cockatoo."),
                              ("realshort.mp4", "sill.png", "Describe the image.", "Plants.")):
        frame = decode.load_video(SAMPLES / video, max_frames=1, pad_to_square=False).frames[0]
        PIL.Image.fromarray(frame).save(images / name)
        lines.append(json.dumps({"image": name, "conversations": [
            {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}) + "\n")
    (tmp_path / "images.jsonl").write_text("".join(lines))
    c.input.annotations = str(tmp_path / "images.jsonl")
    c.input.video_root = str(images)
    assert c.model.compressor is None and c.model.beats is None and c.input.max_frames == 1
    assert c.model.connector.query_grid == c.model.tower_grid  # windows of one token
    assert not c.model.connector.swap_image_size_hw  # images: (height, width) read as such
    c.model.llm.num_layers = _LLM_LAYERS
    for part in ("connector", "siglip", "dinov2"):  # one layer each: compile time
        c.model[part].depth = 1
    init, final, metrics = _train_capturing_init(c, tmp_path / "wd")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["target_tokens"] > 0 for m in metrics)
    assert metrics[-1]["skipped_records"] == 0
    assert set(init) == {"siglip", "dinov2", "connector", "llm"}
    changed, frozen = _check_moved_exactly_trainable(c, init, final, "stage 1, model=tdc")
    assert {p.split("/")[0] for p, f in frozen.items() if not f} == {"connector", "llm"}
    assert not any("pos_embed" in p for p in changed if p.startswith("connector/"))
    assert changed["connector/image_newline"] and changed["connector/vision_query"]
