r"""Answers questions about videos with a trained checkpoint, streaming tokens as they come.

    python -m longvid_jax.infer --config=configs/tdc.py[:args] --checkpoint=DIR \
        --video=FILE --question="What happens?" [--max_new_tokens=256] [--temperature=0] \
        [--top_k=0] [--top_p=1.0] [--seed=0]
    python -m longvid_jax.infer --config=... --checkpoint=DIR --batch_jsonl=FILE \
        --output=ANSWERS.jsonl

`--checkpoint` is a training workdir (its newest step under `DIR/checkpoints/` is used), a
checkpoints folder, or one step folder (`.../checkpoints/<step>`). Only the parameters are read
from it (orbax partial restore); LoRA adapters (`config.lora`, stage 3) are merged into their
kernels after loading. The config must be the one the checkpoint was trained with
(the same `--config=...` argument and overrides, `--config.x=y` works here too).

Stages, each timed and printed (to stderr, the answer goes to stdout):
  1. decode video: frames and audio exactly as the training pipeline reads them
     (`input.decode.load_video` / `load_audio`, `input.audio.per_second_features`, the config's
     fps, max_frames, image size and normalisation);
  2. encode: vision tower (and audio encoder) a chunk of frames at a time with a progress bar,
     then the TDC compressor and the splice of the video tokens into the chat prompt
     (`input.chat.tokenize_conversation` with the config's template, assistant turn open);
  3. prefill: the LLM over the prompt, filling the KV cache (`generate.generate`);
  4. generate: one token per step until a stop token (the template's end of turn or the
     tokenizer's EOS) or `--max_new_tokens`, with tokens/s.

Batch mode reads one JSON object per line with `video` and `question` (or LLaVA
`conversations`, whose first human turn is the question) and writes one line per input with
`video`, `question`, `answer` and the stage times.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from tqdm import tqdm

from longvid_jax import generate as gen
from longvid_jax import model_families, xla_flags
from longvid_jax.input import audio as audio_lib
from longvid_jax.input import chat, decode
from longvid_jax.input import tokenizer as tokenizer_lib
from longvid_jax.input.pipeline import PipelineConfig
from longvid_jax.input.transforms import AUDIO_WINDOW, pad_id
from longvid_jax.models import decoder, video_llm

try:  # LoRA adapters (stage 3); absent in trees without longvid_jax.models.lora
    from longvid_jax.models import lora as lora_lib
except ImportError:  # pragma: no cover
    lora_lib = None

PROMPT_BUCKET = 128  # prompts are right-padded to a multiple of this many tokens


class InferenceError(ValueError):
    """Bad inference input (checkpoint, video or batch file); the message names the path."""


# ------------------------------------------------------------------------------------ config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`"configs/tdc.py:size=demo"` -> the config that file's `get_config(arg)` returns.

    Raises:
      InferenceError: the file does not exist or has no `get_config`.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise InferenceError(f"{path}: config file not found")
    module_spec = importlib.util.spec_from_file_location("_infer_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise InferenceError(f"{path}: no get_config function")
    return module.get_config(arg or None)


# -------------------------------------------------------------------------------- checkpoint


def _step_dir(checkpoint: str) -> str:
    """The step folder (holding `state/`) that `checkpoint` designates."""
    path = os.path.abspath(checkpoint)
    if not os.path.isdir(path):
        raise InferenceError(f"{checkpoint}: checkpoint folder not found")
    if os.path.isdir(os.path.join(path, "state")):
        return path
    root = os.path.join(path, "checkpoints") if os.path.isdir(
        os.path.join(path, "checkpoints")) else path
    steps = sorted(int(d) for d in os.listdir(root)
                    if d.isdigit() and os.path.isdir(os.path.join(root, d, "state")))
    if not steps:
        raise InferenceError(f"{checkpoint}: no checkpoint found (expected "
                             "<workdir>/checkpoints/<step>/state from longvid_jax.train)")
    return os.path.join(root, str(steps[-1]))


def lora_config(config: ml_collections.ConfigDict):
    """The run's enabled `lora.LoRAConfig` (`config.lora`), or None."""
    if lora_lib is None or config.get("lora") is None:
        return None
    cfg = lora_lib.from_dict(config.get("lora"))
    return cfg if cfg is not None and cfg.enabled else None


def abstract_params(model: Any, input_cfg, lora_cfg=None) -> Any:
    """`jax.ShapeDtypeStruct`s of a model's parameters (nothing allocated), with the LoRA
    adapters of `lora_cfg` (a `lora.LoRAConfig` or None) as the trainer creates them.

    `model` is a `model_families` family, or a `VideoLLMConfig` (its family is built)."""
    family = (model if isinstance(model, model_families.ModelFamily)
              else model_families.VideoLLMFamily(model))
    batch = family.example_batch(input_cfg)
    ctx = lora_lib.lora_context(lora_cfg) if lora_cfg is not None else contextlib.nullcontext()
    with ctx:
        return jax.eval_shape(lambda r: nn.unbox(family.init(r, batch)["params"]),
                              jax.random.key(0))


def input_config(config: ml_collections.ConfigDict) -> PipelineConfig:
    """The training config's `input` as a `PipelineConfig` (no annotation file needed)."""
    return PipelineConfig.from_dict(
        {**config.input.to_dict(), "annotations": config.input.annotations or "-"})


def restore_params(checkpoint: str, abstract: Any) -> tuple[Any, str]:
    """Reads only the parameters of a training checkpoint onto the first device.

    Args:
      checkpoint: workdir, checkpoints folder or step folder (module docstring).
      abstract: the parameters' `jax.ShapeDtypeStruct`s (`abstract_params`).

    Returns:
      (params, the step folder read).

    Raises:
      InferenceError: no checkpoint there, or one of another model (names the folder).
    """
    step_dir = _step_dir(checkpoint)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise InferenceError(f"cannot read parameters of this model from {step_dir}: "
                             f"{str(e)[:500]}") from e
    return out["params"], step_dir


# ------------------------------------------------------------------------------------- input


def prepare_example(input_cfg: PipelineConfig, model_cfg: video_llm.VideoLLMConfig, tok,
                    video: str, question: str) -> dict[str, np.ndarray]:
    """One example with batch axis 1, read exactly as `input.transforms.DecodeExample` does,
    but with the question alone and the assistant turn open (`add_generation_prompt`).

    Returns:
      frames, frame_mask, audio_mel, audio_mask, input_ids, positions, segment_ids,
      qformer_text_ids, qformer_text_mask (see `input.pipeline`), each [1, ...].

    Raises:
      decode.VideoDecodeError: a missing or unreadable video (the message names the file).
    """
    cfg = input_cfg
    num_max, side = cfg.max_frames, cfg.image_size
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    clip = decode.load_video(video, fps=cfg.fps, max_frames=num_max, size=side,
                             pad_to_square=True, fill=tuple(int(m * 255) for m in cfg.image_mean),
                             num_threads=cfg.decode_threads)
    n = clip.frames.shape[0]
    frames = np.zeros((num_max, side, side, 3), np.float32)
    frames[:n] = (clip.frames.astype(np.float32) / 255.0 - mean) / std
    audio_mel = np.zeros((num_max, cfg.num_mel_bins, AUDIO_WINDOW), np.float32)
    audio_mask = np.zeros((num_max,), bool)
    if cfg.num_mel_bins > 0:
        wave = decode.load_audio(video, sample_rate=cfg.sample_rate)
        mel, has_audio = audio_lib.per_second_features(
            wave, clip.timestamps, clip.duration, num_mel_bins=cfg.num_mel_bins,
            sample_rate=cfg.sample_rate, n_fft=cfg.sample_rate // 40,
            hop_length=cfg.sample_rate // 100, frames_per_second=AUDIO_WINDOW)
        audio_mel[:n], audio_mask[:n] = mel, has_audio
    conversation = [{"from": "human", "value": "<video>\n" + question}]
    text = chat.tokenize_conversation(
        conversation, tok, template=cfg.template, system=cfg.system,
        num_video_tokens=video_llm.num_video_tokens(model_cfg, n), add_generation_prompt=True)
    ids = text["input_ids"].astype(np.int32)
    q_len = cfg.qformer_text_len
    q_ids = np.full((q_len,), pad_id(tok), np.int32)
    q_mask = np.zeros((q_len,), bool)
    if q_len:
        q = tok.encode(chat.question_text(conversation), add_special_tokens=False)[:q_len]
        q_ids[: len(q)], q_mask[: len(q)] = q, True
    example = {
        "frames": frames, "frame_mask": np.arange(num_max) < n, "audio_mel": audio_mel,
        "audio_mask": audio_mask, "input_ids": ids,
        "positions": np.arange(ids.shape[0], dtype=np.int32),
        "segment_ids": np.ones(ids.shape, np.int32), "qformer_text_ids": q_ids,
        "qformer_text_mask": q_mask,
    }
    return {k: v[None] for k, v in example.items()}


def stop_token_ids(tok, template: str) -> list[int]:
    """The template's end-of-answer token (e.g. `<|im_end|>`) and the tokenizer's EOS."""
    out = []
    suffix = chat.get_template(template).assistant_suffix.strip()
    if suffix:
        ids = tok.encode(suffix, add_special_tokens=False)
        if len(ids) == 1:
            out.append(int(ids[0]))
    if tok.eos_token_id is not None:
        out.append(int(tok.eos_token_id))
    return sorted(set(out))


# ----------------------------------------------------------------------------------- model


def generate_answer(llm_params: Any, llm_cfg: decoder.DecoderConfig, embeds: jax.Array, tok,
                    stop_ids: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    stream: TextIO | None = None) -> tuple[str, gen.GenerationResult]:
    """Generates the answer to one prompt [1, T, D], writing its text to `stream` as it comes
    (whole characters only) and a newline at the end.

    The prompt is right-padded to a multiple of `PROMPT_BUCKET` tokens so that prompts of
    similar lengths share the prefill and decode compilations. A config's `attention_impl`
    "xla" (the `DecoderConfig` default, what converted checkpoints carry) becomes "auto" for the
    prefill, so a long prompt runs a flash kernel on GPU / TPU instead of materialising its
    [T, T] scores (on CPU "auto" is "xla").

    Returns:
      (answer text without special tokens, the `generate.GenerationResult`).
    """
    if llm_cfg.attention_impl == "xla":
        llm_cfg = dataclasses.replace(llm_cfg, attention_impl="auto")
    prompt_len = embeds.shape[1]
    ids: list[int] = []
    shown = [""]

    def on_token(tokens, active):
        if not active[0] or int(tokens[0]) in stop_ids:
            return
        ids.append(int(tokens[0]))
        text = tok.decode(ids, skip_special_tokens=True)
        if stream is not None and not text.endswith("\ufffd"):
            stream.write(text[len(shown[0]):])
            stream.flush()
            shown[0] = text

    padded = -(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET
    embeds = jnp.pad(embeds, ((0, 0), (0, padded - prompt_len), (0, 0)))
    res = gen.generate(llm_params, llm_cfg, prompt_embeds=embeds, prompt_lengths=[prompt_len],
                       max_new_tokens=max_new_tokens,
                       max_len=padded + -(-max_new_tokens // PROMPT_BUCKET) * PROMPT_BUCKET,
                       temperature=temperature, top_k=top_k, top_p=top_p,
                       stop_token_ids=stop_ids, rng=jax.random.key(seed), pad_id=pad_id(tok),
                       on_token=on_token)
    answer = tok.decode(res.sequences()[0], skip_special_tokens=True)
    if stream is not None:
        stream.write(answer[len(shown[0]):] + "\n")
        stream.flush()
    return answer, res


def make_predictor(config: ml_collections.ConfigDict, checkpoint: str | None = None, *,
                   params: Any = None, log: TextIO | None = None):
    """The predictor of a training config: `Predictor` (the simplified `VideoLLM`), or for
    `config.model.name == "tdc"` a `tdc_infer.TDCPredictor` on the trainer's checkpoint (the
    Q-Former text through `config.input.qformer_tokenizer`, else the LLM tokenizer's ids, as
    the model was trained; LoRA adapters of `config.lora` restored and merged).

    Raises:
      InferenceError: no checkpoint or params, or an unreadable checkpoint.
    """
    if config.model.get("name", "video_llm") != "tdc":
        return Predictor(config, checkpoint, params=params, log=log)
    from longvid_jax import tdc_infer  # pylint: disable=import-outside-toplevel

    log = log if log is not None else sys.stderr
    family = model_families.from_config(config.model)
    lora_cfg = lora_config(config)  # stage 3: the checkpoint holds adapters; merged here
    if params is None:
        if checkpoint is None:
            raise InferenceError("give a checkpoint folder or params")
        params, step_dir = restore_params(
            checkpoint, abstract_params(family, input_config(config), lora_cfg))
        print(f"[load] parameters from {step_dir}", file=log, flush=True)
    if lora_cfg is not None and lora_lib.lora_param_count(params):
        params = lora_lib.merge_lora(params, lora_cfg)
    tok = tokenizer_lib.load_tokenizer(config.input.tokenizer)
    q_spec = config.input.get("qformer_tokenizer")
    bert = tokenizer_lib.wordpiece_tokenizer(q_spec) if q_spec else tok
    return tdc_infer.TDCPredictor(params, family.config, tok, bert_tokenizer=bert, log=log)


class Predictor:
    """A restored model with jitted encoders; answers one (video, question) at a time.

    Args:
      config: the training config (ConfigDict).
      checkpoint: see `restore_params`.
      params: parameters to use instead of reading `checkpoint` (tests).
      encode_chunk: frames per vision / audio encoder call (the progress bar's unit).
      log: where stage times and progress go.
    """

    def __init__(self, config: ml_collections.ConfigDict, checkpoint: str | None = None, *,
                 params: Any = None, encode_chunk: int = 8, log: TextIO | None = None):
        self.config = config
        self.log = log if log is not None else sys.stderr
        self.input_cfg = input_config(config)
        self.model_cfg = video_llm.make_config(config.model)
        self.model = video_llm.VideoLLM(self.model_cfg)
        self.tok = tokenizer_lib.load_tokenizer(self.input_cfg.tokenizer)
        self.stop_ids = stop_token_ids(self.tok, self.input_cfg.template)
        self.encode_chunk = max(1, int(encode_chunk))
        if params is None:
            if checkpoint is None:
                raise InferenceError("give a checkpoint folder or params")
            t = time.perf_counter()
            lora_cfg = lora_config(config)
            params, step_dir = restore_params(
                checkpoint, abstract_params(self.model_cfg, self.input_cfg, lora_cfg))
            if lora_cfg is not None:  # fold the adapters in: the model then runs without LoRA
                params = lora_lib.merge_lora(params, lora_cfg)
            self._print(f"[load] parameters from {step_dir} in {time.perf_counter() - t:.2f} s")
        self.params = params
        # Decoding runs the LLM with unrolled layers (each layer's weights read in place); a
        # scanned checkpoint is unstacked once here.
        llm_cfg = self.model_cfg.llm
        llm_params = params["llm"]
        if llm_cfg.scan_layers:
            llm_cfg = dataclasses.replace(llm_cfg, scan_layers=False, remat_policy="none")
            llm_params = decoder.unstack_layer_params(llm_params)
        if llm_cfg.compute_dtype.itemsize < llm_cfg.weight_dtype.itemsize:
            # Decoding reads every weight once per token: keep the matrices in the compute
            # dtype (bf16) instead of casting float32 masters inside each step.
            llm_params = jax.tree.map(
                lambda x: x.astype(llm_cfg.compute_dtype) if x.ndim >= 2 else x, llm_params)
            llm_cfg = dataclasses.replace(llm_cfg, param_dtype=str(llm_cfg.compute_dtype))
        self.llm_cfg, self.llm_params = llm_cfg, llm_params
        self._frames, self._audio, self._splice = _encoder_fns(self.model_cfg)

    def _print(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    def encode(self, example: Mapping[str, np.ndarray]) -> jax.Array:
        """Prompt embeddings [1, T, D]: the encoders a chunk of frames at a time (progress
        bar), then the compressor and the splice into the text embeddings."""
        f = example["frames"].shape[1]
        c = min(self.encode_chunk, f)
        n_real = int(example["frame_mask"].sum())
        frame_tokens, audio_tokens = [], []
        with tqdm(total=n_real, desc="encode", unit="frame", file=self.log,
                  dynamic_ncols=True) as bar:
            for start in range(0, f, c):
                sl = slice(start, start + c)
                frames = example["frames"][:, sl]
                pad = c - frames.shape[1]
                if start >= n_real:  # padding frames only: their tokens are never used
                    frame_tokens.append(jnp.zeros_like(frame_tokens[-1][:, :frames.shape[1]]))
                    if self.model_cfg.audio is not None:
                        audio_tokens.append(
                            jnp.zeros_like(audio_tokens[-1][:, :frames.shape[1]]))
                    continue
                frames = np.pad(frames, ((0, 0), (0, pad)) + ((0, 0),) * 3)
                frame_tokens.append(self._frames(self.params, frames)[:, : c - pad])
                if self.model_cfg.audio is not None:
                    mel = np.pad(example["audio_mel"][:, sl], ((0, 0), (0, pad), (0, 0), (0, 0)))
                    audio_tokens.append(self._audio(self.params, mel)[:, : c - pad])
                jax.block_until_ready(frame_tokens[-1])
                bar.update(min(n_real, start + c) - min(n_real, start))
        ft = jnp.concatenate(frame_tokens, axis=1)
        at = jnp.concatenate(audio_tokens, axis=1) if audio_tokens else None
        batch = {k: example[k] for k in ("frame_mask", "input_ids", "qformer_text_ids",
                                         "qformer_text_mask")}
        return self._splice(self.params, batch, ft, at)

    def answer(self, video: str, question: str, *, max_new_tokens: int = 256,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stream: TextIO | None = None) -> dict[str, Any]:
        """Answers `question` about `video`, streaming the text to `stream` as it comes.

        Returns:
          dict with `answer` (text), `tokens` (ids, stop token excluded), `prompt_tokens`,
          `frames` and `times` (seconds per stage: decode_video, encode, prefill, generate)
          and `tokens_per_s`.

        Raises:
          decode.VideoDecodeError: a missing or unreadable video, naming the file.
        """
        times = {}
        t = time.perf_counter()
        example = prepare_example(self.input_cfg, self.model_cfg, self.tok, video, question)
        times["decode_video"] = time.perf_counter() - t
        n_frames = int(example["frame_mask"].sum())
        self._print(f"[decode video] {video}: {n_frames} frames in "
                    f"{times['decode_video']:.2f} s")
        t = time.perf_counter()
        embeds = jax.block_until_ready(self.encode(example))
        times["encode"] = time.perf_counter() - t
        prompt_len = embeds.shape[1]
        self._print(f"[encode] {prompt_len} prompt tokens "
                    f"({video_llm.num_video_tokens(self.model_cfg, n_frames)} video) in "
                    f"{times['encode']:.2f} s")

        answer, res = generate_answer(
            self.llm_params, self.llm_cfg, embeds, self.tok, self.stop_ids,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, stream=stream)
        n_new = int(res.tokens.shape[1])
        times["prefill"], times["generate"] = res.prefill_s, res.decode_s
        rate = res.decode_tokens_per_s
        self._print(f"[prefill] {prompt_len} tokens in {res.prefill_s:.2f} s")
        self._print(f"[generate] {n_new} tokens in {res.decode_s:.2f} s "
                    f"({rate:.1f} tokens/s after the first)"
                    + (", stopped" if res.stopped[0] else ", hit max_new_tokens"))
        return {"answer": answer, "tokens": res.sequences()[0], "prompt_tokens": prompt_len,
                "frames": n_frames, "times": times, "tokens_per_s": rate}


@functools.lru_cache(maxsize=8)
def _encoder_fns(model_cfg: video_llm.VideoLLMConfig):
    """Jitted (frames, audio, compress-and-splice) functions, shared by every `Predictor` of a
    model config so their compilations are reused."""
    model = video_llm.VideoLLM(model_cfg)
    frames = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                              method=lambda m, f: m.encode_frames(f)))
    audio = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                             method=lambda m, a: m.encode_audio(a)))
    splice = jax.jit(lambda p, b, ft, at: model.apply({"params": p}, b, ft, at,
                                                      method=_compress_and_splice))
    return frames, audio, splice


def _compress_and_splice(module: video_llm.VideoLLM, batch, frame_tokens, audio_tokens):
    """The TDC compressor over the encoded frames, then the splice (`VideoLLM.__call__`'s
    first half) -> prompt embeddings [B, T, D]."""
    c = module.config
    text_ids = batch["qformer_text_ids"] if c.compressor.text_input else None
    text_mask = batch["qformer_text_mask"] if text_ids is not None else None
    video, _, _ = module.compressor(frame_tokens, batch["frame_mask"], audio_tokens=audio_tokens,
                                    text_ids=text_ids, text_mask=text_mask)
    ids = batch["input_ids"]
    text = module.llm.embed(jnp.where(ids == video_llm.VIDEO_TOKEN_INDEX, 0, ids))
    return video_llm.splice_video_tokens(text, ids, video)


# ------------------------------------------------------------------------------------ batch


def read_batch(path: str) -> list[dict[str, str]]:
    """(video, question) records of a JSONL file (module docstring).

    Raises:
      InferenceError: a missing file or a malformed line (names the file and line).
    """
    if not os.path.isfile(path):
        raise InferenceError(f"{path}: batch file not found")
    out = []
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                question = rec.get("question")
                if question is None:
                    question = chat.question_text(rec["conversations"])
                video = rec["video"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise InferenceError(f"{path}:{i}: needs 'video' and 'question' (or "
                                     f"'conversations'): {e}") from e
            if not os.path.isabs(video) and not os.path.exists(video):
                video = os.path.join(base, video)
            out.append({"video": video, "question": question})
    return out


def run(config: ml_collections.ConfigDict, checkpoint: str | None, *, video: str | None = None,
        question: str | None = None, batch_jsonl: str | None = None, output: str | None = None,
        max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, params: Any = None, stream: TextIO | None = None,
        log: TextIO | None = None) -> list[dict[str, Any]]:
    """The CLI's work: one video and question, or every line of `batch_jsonl`.

    Answers stream to `stream` (default stdout); stage times go to `log` (default stderr).
    In batch mode a record whose video cannot be read gets an `error` instead of an answer
    (and the run goes on); `output` (default stdout) receives one JSON line per record.

    Returns:
      The result dicts (see `Predictor.answer`), with `video` and `question`.

    Raises:
      InferenceError: bad arguments, checkpoint or batch file.
      decode.VideoDecodeError: the single video cannot be read (names the file).
    """
    stream = sys.stdout if stream is None else stream
    if (video is None) == (batch_jsonl is None):
        raise InferenceError("give --video (with --question) or --batch_jsonl")
    if video is not None and not question:
        raise InferenceError("--question is required with --video")
    records = ([{"video": video, "question": question}] if video is not None
               else read_batch(batch_jsonl))
    if video is not None and not os.path.exists(video):  # fail before loading the model
        raise decode.VideoDecodeError(video, "file not found")
    predictor = make_predictor(config, checkpoint, params=params, log=log)
    kw = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
          "top_p": top_p, "seed": seed}
    if video is not None:
        out = predictor.answer(video, question, stream=stream, **kw)
        return [{"video": video, "question": question, **out}]
    results = []
    with (open(output, "w") if output else contextlib.nullcontext(stream)) as f:
        for rec in records:
            try:
                out = predictor.answer(rec["video"], rec["question"], **kw)
            except decode.VideoDecodeError as e:
                predictor._print(f"[error] {e}")
                out = {"error": str(e)}
            line = {"video": rec["video"], "question": rec["question"],
                    **{k: v for k, v in out.items() if k != "tokens"}}
            f.write(json.dumps(line) + "\n")
            f.flush()
            results.append(line)
    return results


# -------------------------------------------------------------------------------------- CLI


def _define_flags():
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (get_config), as trained.",
                                    lock_config=True)
    flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints folder or step "
                        "folder.")
    flags.DEFINE_string("video", None, "Video file.")
    flags.DEFINE_string("question", None, "Question about the video.")
    flags.DEFINE_string("batch_jsonl", None, "JSONL of {video, question} records.")
    flags.DEFINE_string("output", None, "Batch mode: answers JSONL (default stdout).")
    flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate at most.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling temperature.")
    flags.DEFINE_integer("top_k", 0, "Sampling: keep the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Sampling: nucleus probability mass.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    del argv
    f = flags.FLAGS
    if f.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/tdc.py")
    if f.checkpoint is None:
        raise app.UsageError("--checkpoint is required")
    logging.set_verbosity(logging.WARNING)  # orbax narrates every read at INFO
    xla_flags.apply_defaults()  # before the backend starts
    try:
        run(f.config, f.checkpoint, video=f.video, question=f.question,
            batch_jsonl=f.batch_jsonl, output=f.output, max_new_tokens=f.max_new_tokens,
            temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, seed=f.seed)
    except (InferenceError, decode.VideoDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
