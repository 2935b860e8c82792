r"""TDC: temporal dynamic context video LLM (Hoar012/TDC-Video), trained on video with sound.

Demo (a tiny TDC-shaped model on the bundled clips in data/samples/, minutes on a laptop CPU):

    python -m longvid_jax.train --config=configs/tdc.py --workdir=runs/tdc_demo

Real sizes (Qwen2-7B or Llama-3.2-3B + SigLIP-so400m + Whisper-large-v3 audio + BERT-base
Q-Former), your own data, one of TDC's three training stages:

    python -m longvid_jax.train --config=configs/tdc.py:stage=2,size=full,llm=qwen2_7b,bert_vocab=/bert/vocab.txt \
        --config.input.annotations=/data/tdc_stage2.jsonl --config.input.video_root=/data/videos \
        --workdir=/ckpt/tdc_stage2

Arguments after ':' (comma separated): stage=1|2|3 (default: none, see below), size=demo|full,
llm=qwen2_7b|llama3_2_3b (full only), model=tdc|simplified (default: tdc with a stage,
simplified for the demo), bert_vocab=PATH. Any field can be overridden with
--config.<path>=<value>.

model=tdc trains TDC as released (`longvid_jax.models.tdc.TDCModel`: SigLIP + DINOv2 towers,
the SVA connector, the in-graph scene split, the compressor reading the instruction in BERT
WordPiece ids from `bert_vocab` (bert-base-uncased vocab.txt; required at full size from
stage 2 on), the per-chunk overflow trim), for all three stages and the demo; with audio
(stage 3, the demo) BEATs runs frozen inside the step on the pipeline's 10 s fbank windows
(`input.beats_windows` = ceil(max_frames / fps / 10): a longer track is cut; the original
encodes it all) and each frame's audio is computed in-graph by the original's rule, as
`tdc_infer` does: 50 tokens per second sliced from its window, a frame's own and skipped
seconds pooled to 50 (`models.tdc.tdc_frame_audio`). The original's (H, W) swap in unpadding video frames is off for this new
training (`model.connector.swap_image_size_hw=False`; True reproduces the released weights'
geometry). model=simplified is the earlier stand-in `VideoLLM`: one tower with pooling
instead of the SVA connector, Whisper audio, the LLM tokenizer's ids for the Q-Former; it
serves all three stages and is the demo's default (it compiles and trains several times
faster on a laptop CPU; `configs/tdc.py:model=tdc` runs the demo on TDC itself).

The stages (`scripts/stage{1,2,3}/*.sh` of the original; all: AdamW, cosine schedule, warmup
ratio 0.03, weight decay 0, 1 epoch, bf16, sequences up to 8192 tokens = the largest length
bucket, towers frozen). Batches are per process: on one 8-GPU host `input.batch_size` =
per-GPU batch x `grad_accum_steps` x 8, as the original's per-device x accumulation x 8 GPUs.
Each stage's token layout and trainable set are given for model=simplified first, then for
model=tdc (the default when a stage is named).

  stage=1  image-text alignment. Data: LLaVA-OneVision single images (records with
           `"image": path` and `<image>`; .jpg / .png / .webp / .bmp files are decoded as
           one-frame clips, `input.max_frames=1`): each record yields one static frame of 576
           tokens (24x24, `model.vision_pool`) plus the frame separator, where TDC's LongVU
           image path adds 24 row-newline tokens instead. No audio.
           Trained: the LLM and the projector; frozen: the vision tower and the TDC
           compressor (TDC creates its Q-Former only in stage 2). LR 1e-5; batch 4 x 2 x 8.
           model=tdc builds the LongVU image model instead: 576 SVA queries (24 x 24, one
           query per tower-grid cell, so the windows hold one token per tower and there is no
           `pos_embed`), `image_newline` after each row (24 x 25 = 600 slots for a square
           image, fewer after unpadding: the row reserves 600 and the step drops the unused),
           no compressor, no frame separator; trained: everything but SigLIP / DINOv2. The
           image's decoded (height, width) is read as such
           (`connector.swap_image_size_hw=False`), as the original reads the PIL size of an
           image (the swap is its video path's quirk).
  stage=2  video instruction tuning. Data: TDC stage-2 video JSON (LLaVA conversations with
           `<image>` / `<video>`), 1 fps, 144 tokens per static frame (12x12), up to 224
           frames (28 chunks x 264 tokens = 7392 video tokens), no audio. Trained: everything
           but the vision tower (TDC: "full"). LR 5e-6 (Qwen2) / 2e-5 (Llama); batch 1 x 2 x 8.
  stage=3  audio-video instruction tuning. Data: TDC stage-3 audio-video JSON (the sound from
           each record's "audio" file as the original loads it, else the video's own track;
           a record without audio gets no audio tokens, as in the original);
           144 + 50 audio tokens per static frame, up to 192 frames (24 chunks x 314 = 7536
           video tokens) with model=simplified; model=tdc decodes up to 224 frames as the
           original (`uniform_sample(..., 224)`, `input.frame_subsample="floor"`, in every
           stage) and its max-frame rule keeps what fits.
           Trained: LoRA adapters (r=128, alpha=256, dropout 0.05; `config.lora`, targets
           `lora.TDC_TARGETS`) plus the whole Q-Former, `frame_seg`, `audio_proj` and the SVA
           connector's `pos_embed_*` (model=tdc; the stand-in has no SVA); frozen: everything
           else (the base LLM, projector, towers, BEATs, query_proj / vision_proj kernels).
           model=tdc adds, as PEFT's suffix match does in the original, an adapter on the
           SVA's attention output (`cross_attn.o_proj`). LR 2e-5; batch 1 x 1 x 8.
           With model=tdc the pipeline applies TDC's max-frame rule (`get_max_num_frames`:
           (8192 - text - 16) // 38 frames with audio, at most 215 of the 224; // 32 in
           stage 2, binding above 1008 text tokens): `input.max_frame_context`.
           Merge the adapters for export with `longvid_jax.models.lora.merge_lora`.
  (none)   the demo recipe: stage 2's trainable set and learning rates on audio-video data
           (144 + 50 audio tokens per static frame at full size, 128 frames; BEATs audio with
           model=tdc, Whisper with the stand-in).

Stage 2 starts from the stage-1 weights; stage 3 from stage 1 (Qwen2 script) or stage 2
(Llama script). The trainer initialises from scratch or resumes its own workdir; loading the
previous stage's (converted) weights is a separate step.
Demo sizes keep the same structure at toy scale: 16 vs 4 tokens per static frame (4x4 grid vs
2x2 pooling, the ratio of 576 : 144) and LoRA rank 4.
"""

import dataclasses
import os

import ml_collections

from longvid_jax.config_arg import parse_arg
from longvid_jax.models import audio, beats, decoder, lora, qformer, tdc, vit

_SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "data", "samples")
_QWEN_VOCAB = 151646  # BPE ranks + <|endoftext|>, <|im_start|>, <|im_end|>


def _fields(module_config, drop=("encoder_width", "num_queries")) -> dict:
    """All fields of a module config dataclass as a dict, minus those the model derives."""
    out = {}
    for f in dataclasses.fields(module_config):
        if f.name not in drop:
            value = getattr(module_config, f.name)
            out[f.name] = str(value) if f.name in ("dtype", "param_dtype") else value
    return out


# Stage 3 trains these parameters (path regexes, fully matched) and freezes all others (the
# towers, BEATs, the LLM and connector kernels, query_proj / vision_proj kernels, ...). The
# paths are those of both models: `VideoLLM` and `TDCModel` (model=tdc) name the compressor
# and LLM alike.
_STAGE3_TRAINABLE = (
    r".*/lora_[ab]",  # every LoRA adapter
    r"compressor/qformer/.*",  # TDC "Qformer" (its adapters too)
    r"compressor/frame_seg",
    r"compressor/audio_proj/.*",
    r".*/pos_embed_[0-9]+",  # the SVA connector's window position embeddings
    # (`connector/vision_sampler/layer_i/pos_embed_j`, models/sva.py; model=tdc only)
)


def _all_but(patterns) -> str:
    """One regex that fully matches every path that none of `patterns` fully matches."""
    return "(?!" + "|".join(f"(?:{p})$" for p in patterns) + ").*"


def _tdc_model(demo: bool, llm: str, audio: bool, images: bool) -> tdc.TDCConfig:
    """TDC as released: the tiny test variant with a Qwen2-vocabulary LLM (demo), or the
    released sizes in bf16 with the trainer's LLM settings; with `audio` BEATs (the tiny one at
    demo size, BEATs_iter3_plus_AS2M at full size) feeds the compressor, else no audio.

    `images`: the stage-1 model (LongVU_*_img config): one query per tower-grid cell (24 x 24
    = 576 at full size, so each query's window is one token per tower and the SVA has no
    `pos_embed`), no compressor, no audio.

    `image_sizes` are read as the (height, width) they are (`connector.swap_image_size_hw`
    False) in every stage: the original's (H, W) swap on its video path is kept for the
    released weights (the converter's default) and left out of new training;
    `--config.model.connector.swap_image_size_hw=True` brings it back (e.g. to fine-tune the
    released weights with the geometry they were trained with). The original's
    images carry PIL's (width, height), read correctly, so stage 1 is the same either way."""
    parts: dict = {} if audio else dict(beats=None)
    if images:
        parts.update(compressor=None, beats=None)
    if demo:
        width = 128
        connector = dict(llm_width=width, swap_image_size_hw=False)
        if images:
            connector.update(query_grid=tdc.VARIANTS["tiny"]["tower_grid"])
        else:
            parts["compressor"] = dict(llm_width=width, num_tokens=4,
                                       audio_width=_beats_width("tiny") if audio else 0,
                                       qformer=dict(variant="tiny", vocab_size=_QWEN_VOCAB))
        return tdc.make_config(
            "tiny", **parts,
            llm=dict(variant="tiny", vocab_size=_QWEN_VOCAB, tie_embeddings=True,
                     hidden_size=width, head_dim=32, mlp_dim=384, attention_impl="auto",
                     packed_sequences=False),
            connector=connector)
    parts["connector"] = dict(swap_image_size_hw=False)
    if images:
        parts["connector"].update(query_grid=tdc.TOWER_GRID)
    else:
        parts["compressor"] = dict(audio_width=_beats_width("iter3_as2m") if audio else 0)
    return tdc.make_config(
        llm, **parts, dtype="bfloat16",
        llm=dict(attention_impl="auto", packed_sequences=False, scan_layers=True,
                 remat_policy="dots_attention"))


def _beats_width(variant: str) -> int:
    """Width of a BEATs variant (the compressor's `audio_width`)."""
    return beats.make_config(variant).width


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the TDC training config; see the module docstring for the arguments.

    Raises:
      ValueError: an unknown stage, size or llm.
    """
    arg = parse_arg(arg, stage="", size="demo", llm="qwen2_7b", model="",
                    bert_vocab="")
    if arg.stage not in ("", "1", "2", "3"):
        raise ValueError(f"stage must be 1, 2 or 3, got {arg.stage!r}")
    if arg.size not in ("demo", "full"):
        raise ValueError(f"size must be demo or full, got {arg.size!r}")
    if arg.llm not in ("qwen2_7b", "llama3_2_3b"):
        raise ValueError(f"llm must be qwen2_7b or llama3_2_3b, got {arg.llm!r}")
    if arg.model not in ("", "simplified", "tdc"):
        raise ValueError(f"model must be simplified or tdc, got {arg.model!r}")
    model = arg.model or ("tdc" if arg.stage else "simplified")
    demo = arg.size == "demo"
    stage = int(arg.stage or 0)
    faithful = model == "tdc"
    if faithful and not demo and not arg.bert_vocab and stage != 1:
        raise ValueError("model=tdc at full size reads the instruction in BERT WordPiece ids: "
                         "pass bert_vocab=/path/to/bert-base-uncased/vocab.txt")
    with_audio = stage in (0, 3)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 150 if demo else 10_000
    c.log_every = 5 if demo else 20
    c.ckpt_every = 50 if demo else 500
    c.keep_ckpts = 2
    c.max_skipped_fraction = 0.5  # abort if more than this fraction of records are unreadable
    # Tokens per chunk of the vocabulary projection in the loss (0: whole-batch logits).
    c.loss_chunk = 0 if demo else 2048
    # dtype the chunked loss's head matmul writes logits in (softmax in float32 either way;
    # "bfloat16" saves memory traffic, as transformers' bf16 models do).
    c.loss_logits_dtype = "float32"
    # Micro-batches per step (gradients accumulated); input.batch_size rows split into these.
    c.grad_accum_steps = 1 if demo else {0: 1, 1: 2, 2: 2, 3: 1}[stage]

    # Model. Each sub-dict holds every field of a module config (longvid_jax/models/*.py),
    # resolved from a named variant there, so `--config.model.llm.num_layers=4` works; the
    # modules own the defaults. The Q-Former's encoder width is the LLM's (set by the model).
    c.model = ml_collections.ConfigDict()
    if demo:
        c.model.llm = _fields(decoder.make_config(
            "tiny", vocab_size=_QWEN_VOCAB, tie_embeddings=True, hidden_size=128, head_dim=32,
            mlp_dim=384, attention_impl="auto", packed_sequences=False))
        c.model.vision = _fields(vit.make_config("tiny", post_ln=False))
        c.model.vision_pool = (2, 2) if stage in (2, 3) else None  # 4x4 grid -> 4 tokens
        c.model.audio = _fields(audio.make_config("tiny"))
        c.model.audio_tokens_per_second = 5
        c.model.qformer = _fields(qformer.make_config("tiny", vocab_size=_QWEN_VOCAB))
        c.model.compressor = dict(num_tokens=4, chunk_size=8, text_input=True)
    else:
        bf16 = dict(dtype="bfloat16")
        # Layers under nn.scan (one compiled layer), remat saving projections and attention
        # outputs (benchmarks: the fastest policy at 8K tokens; "full" trains the longest).
        # The pipeline pads rows and never packs them: cuDNN takes the padding as lengths.
        c.model.llm = _fields(decoder.make_config(arg.llm, attention_impl="auto",
                                                  packed_sequences=False, scan_layers=True,
                                                  remat_policy="dots_attention", **bf16))
        c.model.vision = _fields(vit.make_config("so400m_14_384", post_ln=False, **bf16))
        c.model.vision_pool = (24, 24) if stage == 1 else (12, 12)  # 576 / 144 tokens
        c.model.audio = _fields(audio.make_config("large_v3", **bf16))
        c.model.audio_tokens_per_second = 50
        # TDC feeds the instruction to the Q-Former through bert-base-uncased's WordPiece; here
        # the Q-Former reads the LLM tokenizer's ids, so its word table has the LLM's vocabulary.
        c.model.qformer = _fields(qformer.make_config(
            "bert_base", vocab_size=c.model.llm.vocab_size, **bf16))
        c.model.compressor = dict(num_tokens=16, chunk_size=8, text_input=True)
    if not with_audio:
        c.model.audio = None
    if faithful:
        tdc_cfg = _tdc_model(demo, arg.llm, with_audio, images=stage == 1)
        c.model = ml_collections.ConfigDict(dict(name="tdc", **dataclasses.asdict(tdc_cfg)))

    # LoRA (longvid_jax/models/lora.py; rank 0 = off): adapters on the modules whose path fully
    # matches `targets`, switched on by the trainer through `lora.lora_context(config.lora)`.
    if stage == 3:
        c.lora = dataclasses.asdict(lora.make_config("tdc_tiny" if demo else "tdc"))
    else:
        c.lora = dataclasses.asdict(lora.make_config(targets=lora.TDC_TARGETS))

    # Input pipeline (longvid_jax/input/pipeline.py).
    c.input = ml_collections.ConfigDict()
    c.input.annotations = os.path.join(_SAMPLES, "train.jsonl")
    c.input.video_root = ml_collections.FieldReference(None, field_type=str)
    c.input.fps = 1.0
    c.input.max_frames = 1 if stage == 1 else 16 if demo else {0: 128, 2: 224, 3: 192}[stage]
    c.input.image_size = 32 if demo else 384
    c.input.image_mean = (0.5, 0.5, 0.5)  # SigLIP
    c.input.image_std = (0.5, 0.5, 0.5)
    c.input.num_mel_bins = 0 if not with_audio else 16 if demo else 128
    c.input.tokenizer = "qwen2"  # or a local HF checkpoint folder holding the tokenizer
    c.input.template = "chatml"
    c.input.system = "You are a helpful assistant."
    c.input.length_buckets = ((256, 512) if demo else (1024, 2048, 4096, 8192) if stage == 1
                              else (2048, 4096, 8192))
    c.input.qformer_text_len = 32 if demo else 256
    c.input.batch_size = 2 if demo else {0: 8, 1: 64, 2: 16, 3: 8}[stage]
    c.input.num_workers = 2 if demo else 8
    c.input.shuffle = True
    c.input.seed = 0

    if faithful:  # each tower's own preprocessing; the question in BERT ids
        c.input.image_size = tdc_cfg.siglip.image_size
        c.input.image_mean, c.input.image_std = tdc.SIGLIP_MEAN, tdc.SIGLIP_STD
        dino_side = tdc_cfg.dinov2.patch_size * tdc_cfg.siglip.grid
        c.input.tower_views = (("dino_frames", dino_side, tdc.DINO_MEAN, tdc.DINO_STD),)
        c.input.qformer_tokenizer = arg.bert_vocab or None
        # The original's training decode: 1-fps frames cut to 224 by `uniform_sample`
        # (int(i * n / 224)), then the max-frame rule below.
        c.input.frame_subsample = "floor"
        if stage == 3 and not demo:
            c.input.max_frames = 224
        # Rows reserve the most video tokens any scene split gives; the model drops the unused
        # ones and cuts rows to model.max_context, so buckets may exceed 8192.
        c.input.length_buckets = ((256, 512, 1024, 2048) if demo
                                  else (2048, 4096, 8192, 16384))
        if stage == 1:  # no Q-Former; an image reserves its 24 x 25 slots
            c.input.qformer_text_len = 0
            c.input.qformer_tokenizer = None
            c.input.length_buckets = (256, 512) if demo else (1024, 2048, 4096, 8192)
        # Audio for BEATs instead of Whisper features: the track in 10 s fbank windows, enough
        # windows for max_frames seconds (a longer track is cut), each second's tokens and
        # each frame's seconds.
        c.input.num_mel_bins = 0
        c.input.sample_rate = 16000
        c.input.beats_windows = (-(-int(c.input.max_frames / c.input.fps) // 10)
                                 if with_audio else 0)
        c.input.beats_patch = tdc_cfg.beats.patch_size if with_audio else 16
        # TDC's get_max_num_frames: the frames that fit 8192 tokens beside the text (// 38
        # with audio, // 32 without), subsampled uniformly before the towers.
        c.input.max_frame_context = tdc_cfg.max_context

    # Optimizer (TDC: AdamW, cosine, warmup ratio 0.03, weight decay 0; towers frozen).
    c.optim = ml_collections.ConfigDict()
    stage2_lr = 5e-6 if arg.llm == "qwen2_7b" else 2e-5
    c.optim.lr = 3e-3 if demo else {0: stage2_lr, 1: 1e-5, 2: stage2_lr, 3: 2e-5}[stage]
    c.optim.warmup_ratio = 0.03
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 1.0
    # Path regexes (fully matched) of the parameters that never change.
    if stage == 3:
        c.optim.frozen = (_all_but(_STAGE3_TRAINABLE),)
    elif faithful:  # stages 1 and 2: everything but the towers (stage 1 has no compressor)
        c.optim.frozen = ("siglip/.*", "dinov2/.*")
    elif stage == 1:
        c.optim.frozen = ("vision_tower/.*", "audio_encoder/.*", "compressor/.*")
    else:
        c.optim.frozen = ("vision_tower/.*", "audio_encoder/.*")

    # Mesh and logical -> mesh axis rules (longvid_jax/sharding.py).
    # ICI sizes count the devices of one granule (a TPU slice; else a host / process), DCN
    # sizes count granules: by default data parallelism spans the slow network.
    c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1), ("context", 1)]
    c.dcn_mesh = [("data", -1)]
    c.sharding_rules = [
        ("act_batch", ("data", "fsdp")),
        ("act_len", "context"),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("vocab", "tensor"),
        ("head_dim", None),
        ("layers", None),
        ("norm", None),
        ("conv", None),
        (lora.LORA_RANK, None),
    ]
    return c
