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

from longvid_jax import infer, optim, train
from longvid_jax.models import lora

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
        c = _config(stage, tmp)
        c.model.qformer.depth = _QFORMER_DEPTH
        c.model.llm.num_layers = _LLM_LAYERS
        out[stage] = (c, *_train_capturing_init(c, tmp / "wd"))
    return out


def _changed(init, final) -> dict[str, bool]:
    flat_i = {optim.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(init)}
    flat_f = {optim.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(final)}
    assert flat_i.keys() == flat_f.keys()
    return {k: not np.array_equal(flat_i[k], flat_f[k]) for k in flat_i}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_trains_exactly_its_trainable_set(runs, stage):
    c, init, final, metrics = runs[stage]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    changed = _changed(init, final)
    frozen = {optim.path_str(p): f for p, f in jax.tree_util.tree_leaves_with_path(
        optim.frozen_mask(init, c.optim.frozen))}
    for path, moved in changed.items():
        if frozen[path]:
            assert not moved, f"stage {stage}: frozen {path} changed"
        elif not _DEAD.fullmatch(path):
            assert moved, f"stage {stage}: trainable {path} did not change"

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
    full = {s: module.get_config(f"stage={s},size=full") for s in (1, 2, 3)}
    assert [full[s].optim.lr for s in (1, 2, 3)] == [1e-5, 5e-6, 2e-5]
    assert module.get_config("stage=2,size=full,llm=llama3_2_3b").optim.lr == 2e-5
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
    with pytest.raises(ValueError, match="stage 2"):
        module.get_config("stage=3,model=tdc")
