r"""TDC: temporal dynamic context video LLM (Hoar012/TDC-Video), trained on video with sound.

Demo (a tiny TDC-shaped model on the bundled clips in data/samples/, minutes on a laptop CPU):

    python -m longvid_jax.train --config=configs/tdc.py --workdir=runs/tdc_demo

Real sizes (Qwen2-7B or Llama-3.2-3B + SigLIP-so400m + Whisper-large-v3 audio + BERT-base
Q-Former), your own data:

    python -m longvid_jax.train --config=configs/tdc.py:size=full,llm=qwen2_7b \
        --config.input.annotations=/data/tdc_stage2.jsonl --config.input.video_root=/data/videos \
        --workdir=/ckpt/tdc

Arguments after ':' (comma separated): size=demo|full, llm=qwen2_7b|llama3_2_3b (full only).
Any field can be overridden with --config.<path>=<value>.
"""

import dataclasses
import os

import ml_collections

from longvid_jax.config_arg import parse_arg
from longvid_jax.models import audio, decoder, qformer, vit

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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the TDC training config; see the module docstring for the arguments."""
    arg = parse_arg(arg, size="demo", llm="qwen2_7b")
    if arg.size not in ("demo", "full"):
        raise ValueError(f"size must be demo or full, got {arg.size!r}")
    if arg.llm not in ("qwen2_7b", "llama3_2_3b"):
        raise ValueError(f"llm must be qwen2_7b or llama3_2_3b, got {arg.llm!r}")
    demo = arg.size == "demo"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 150 if demo else 10_000
    c.log_every = 5 if demo else 20
    c.ckpt_every = 50 if demo else 500
    c.keep_ckpts = 2
    c.max_skipped_fraction = 0.5  # abort if more than this fraction of records are unreadable
    # Tokens per chunk of the vocabulary projection in the loss (0: whole-batch logits).
    c.loss_chunk = 0 if demo else 2048
    # Micro-batches per step (gradients accumulated); input.batch_size rows split into these.
    c.grad_accum_steps = 1

    # Model. Each sub-dict holds every field of a module config (longvid_jax/models/*.py),
    # resolved from a named variant there, so `--config.model.llm.num_layers=4` works; the
    # modules own the defaults. The Q-Former's encoder width is the LLM's (set by the model).
    c.model = ml_collections.ConfigDict()
    if demo:
        c.model.llm = _fields(decoder.make_config(
            "tiny", vocab_size=_QWEN_VOCAB, tie_embeddings=True, hidden_size=128, head_dim=32,
            mlp_dim=384, attention_impl="auto", packed_sequences=False))
        c.model.vision = _fields(vit.make_config("tiny", post_ln=False))
        c.model.vision_pool = None
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
        c.model.vision_pool = (12, 12)
        c.model.audio = _fields(audio.make_config("large_v3", **bf16))
        c.model.audio_tokens_per_second = 50
        # TDC feeds the instruction to the Q-Former through bert-base-uncased's WordPiece; here
        # the Q-Former reads the LLM tokenizer's ids, so its word table has the LLM's vocabulary.
        c.model.qformer = _fields(qformer.make_config(
            "bert_base", vocab_size=c.model.llm.vocab_size, **bf16))
        c.model.compressor = dict(num_tokens=16, chunk_size=8, text_input=True)

    # Input pipeline (longvid_jax/input/pipeline.py).
    c.input = ml_collections.ConfigDict()
    c.input.annotations = os.path.join(_SAMPLES, "train.jsonl")
    c.input.video_root = ml_collections.FieldReference(None, field_type=str)
    c.input.fps = 1.0
    c.input.max_frames = 16 if demo else 128
    c.input.image_size = 32 if demo else 384
    c.input.image_mean = (0.5, 0.5, 0.5)  # SigLIP
    c.input.image_std = (0.5, 0.5, 0.5)
    c.input.num_mel_bins = 16 if demo else 128
    c.input.tokenizer = "qwen2"  # or a local HF checkpoint folder holding the tokenizer
    c.input.template = "chatml"
    c.input.system = "You are a helpful assistant."
    c.input.length_buckets = (256, 512) if demo else (2048, 4096, 8192)
    c.input.qformer_text_len = 32 if demo else 256
    c.input.batch_size = 2 if demo else 8
    c.input.num_workers = 2 if demo else 8
    c.input.shuffle = True
    c.input.seed = 0

    # Optimizer (TDC: AdamW, cosine, warmup ratio 0.03, weight decay 0; towers frozen).
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3 if demo else (5e-6 if arg.llm == "qwen2_7b" else 2e-5)
    c.optim.warmup_ratio = 0.03
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 1.0
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
    ]
    return c
