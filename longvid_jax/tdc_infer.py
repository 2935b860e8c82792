"""Answering a question about a video with a converted TDC release (`models/tdc.py`).

The steps of TDC's `eval/` scripts and `prepare_inputs_labels_for_multimodal`, with the times
of each reported:

  decode   frames at 1 fps (at most `max_frames`), the max-frame rule
           (`scene_split.max_num_frames`: what fits 8192 tokens next to the prompt) by uniform
           subsampling, `expand2square` with each tower's mean, SigLIP (384 px, mean / std 0.5)
           and DINOv2 (378 px, ImageNet mean / std) pixels; the audio track at 16 kHz
  encode   towers + SVA connector + unpad / `image_newline`, a chunk of frames at a time
  split    scene segments from consecutive DINOv2 features (host)
  audio    BEATs over 10 s windows; 50 tokens per second; each frame gets its own and its
           skipped seconds' tokens pooled to 50 (`tdc.tdc_frame_audio`)
  compress the TDC compressor with the question (BERT WordPiece ids) for the Q-Former
  generate the prompt (`chatml_tdc`, one placeholder per video token), KV-cache generation

`python -m convert.tdc_keys` writes the checkpoint this reads (`load_orbax`).
"""

import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from longvid_jax.infer import PROMPT_BUCKET, generate_answer, pad_id, stop_token_ids
from longvid_jax.input import chat, decode, fbank
from longvid_jax.models import qformer, scene_split, tdc

AUDIO_WINDOW_S = 10  # BEATs runs over 10-second windows
QFORMER_TEXT_LEN = 256
SAMPLE_RATE = 16000


def model_config(configs: Mapping[str, Any]) -> tdc.TDCConfig:
    """`tdc.TDCConfig` from the part configs `convert.tdc_keys.import_tdc` returns.

    Raises:
      ValueError: a tower is missing (import it with --siglip / --dinov2).
    """
    for part in ("siglip", "dinov2"):
        if configs.get(part) is None:
            raise ValueError(f"the checkpoint has no {part} tower: import it with "
                             f"`python -m convert.tdc_keys --{part}=...`")
    return tdc.TDCConfig(siglip=configs["siglip"], dinov2=configs["dinov2"],
                         connector=configs["connector"], compressor=configs["compressor"],
                         llm=configs["llm"], beats=configs.get("beats"),
                         tower_grid=configs["connector"].tower_grids[0])


class TDCPredictor:
    """A TDC model ready to answer questions about videos.

    Args:
      params, configs: `convert.tdc_keys.import_tdc` / `load_orbax` output (LoRA merged, or
        kept adapters are merged here), or a trainer's params with its `tdc.TDCConfig`.
      tokenizer: the LLM's tokenizer (Qwen2 / Llama-3.2, with `<|im_start|>` etc.).
      bert_tokenizer: the Q-Former's BERT WordPiece tokenizer (bert-base-uncased
        `vocab.txt`); required when the compressor reads the instruction (`text_input`).
      max_frames: frames decoded at most (TDC's evaluation: 1000; above it the eval scripts
        keep every (n // 1000)-th 1-fps frame, here a rounded linspace picks 1000. Either way
        the max-frame rule then keeps at most 224 of them, by `int(i * n / keep)`).
      encode_chunk: frames per tower / connector call.
      log: where stage times and progress go (None: silent).
    """

    def __init__(self, params: Mapping[str, Any], configs: Mapping[str, Any] | tdc.TDCConfig,
                 tokenizer, *,
                 bert_tokenizer=None, max_frames: int = 1000, encode_chunk: int = 16,
                 log: TextIO | None = None):
        from longvid_jax.models import lora

        if isinstance(configs, tdc.TDCConfig):  # a trainer's config (model.name="tdc")
            self.config, configs = configs, {}
        else:
            self.config = model_config(configs)
        if self.config.compressor is None:
            raise ValueError("a stage-1 TDC model (images, no compressor) does not answer "
                             "about videos: train stage 2 from it first")
        if self.config.compressor.text_input and bert_tokenizer is None:
            raise ValueError("this TDC compressor reads the question: pass bert_tokenizer "
                             "(bert-base-uncased vocab.txt)")
        if configs.get("lora") is not None:
            params = lora.merge_lora(params, configs["lora"])
        self.params = jax.tree.map(jnp.asarray, dict(params))
        self.tok, self.bert = tokenizer, bert_tokenizer
        self.max_frames, self.encode_chunk, self.log = max_frames, encode_chunk, log
        self.template = "chatml_tdc"
        self.stop_ids = stop_token_ids(tokenizer, self.template)
        model = tdc.TDCModel(self.config)
        self._encode = jax.jit(lambda p, s, d, z: model.apply(
            {"params": p}, s, d, z, method=tdc.TDCModel.encode_frames))
        self._audio = (jax.jit(lambda p, *a: model.apply({"params": p}, *a,
                                                         method=tdc.TDCModel.frame_audio))
                       if self.config.beats is not None else None)
        self._compress = jax.jit(
            lambda p, t, c, m, s, a, i, im, n: model.apply(
                {"params": p}, t, c, m, segment_starts=s, audio_tokens=a, text_ids=i,
                text_mask=im, max_tokens=n, method=tdc.TDCModel.compress),
            static_argnums=8)
        self._splice = jax.jit(lambda p, ids, video: _splice(model, p, ids, video))

    def _print(self, text: str) -> None:
        if self.log is not None:
            print(text, file=self.log, flush=True)

    def prompt_len_without_video(self, question: str) -> int:
        """Text tokens of the prompt around the video (for the max-frame rule)."""
        conv = [{"from": "human", "value": "<image>\n" + question}]
        return len(chat.tokenize_conversation(conv, self.tok, template=self.template,
                                              num_video_tokens=0,
                                              add_generation_prompt=True)["input_ids"])

    def answer(self, video: str, question: str, *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stream: TextIO | None = None) -> dict[str, Any]:
        """Answers `question` about `video` (greedy, or sampling as `generate.sample_logits`),
        writing the text to `stream` as it comes when given.

        Returns:
          dict with `answer`, `tokens`, `frames`, `video_tokens` (count), `video` (the
          compressed video tokens [video_tokens, D]), `segments`, `chunks` and `times` (seconds per
          stage: decode, encode, split, audio, compress, generate).

        Raises:
          decode.VideoDecodeError: a missing or unreadable video (naming the file).
        """
        c, times = self.config, {}
        t = time.perf_counter()
        clip = decode.load_video(video, fps=1.0, max_frames=self.max_frames,
                                 size=c.siglip.image_size, pad_to_square=False)
        text_len = self.prompt_len_without_video(question)
        keep = scene_split.max_num_frames(text_len, with_audio=c.beats is not None)
        idx = np.arange(len(clip.frames))
        if len(idx) > keep:  # the original's uniform subsampling to what fits the context
            idx = (np.arange(keep) * (len(idx) / keep)).astype(int)
        frames, stamps = clip.frames[idx], clip.timestamps[idx]
        n = len(frames)
        dino_side = c.dinov2.patch_size * c.siglip.grid
        sig_px = decode.tower_pixels(frames, c.siglip.image_size, tdc.SIGLIP_MEAN, tdc.SIGLIP_STD)
        dino_px = decode.tower_pixels(frames, dino_side, tdc.DINO_MEAN, tdc.DINO_STD)
        sizes = np.broadcast_to(np.asarray(frames.shape[1:3], np.int32), (n, 2))
        wave = (decode.load_audio(video, sample_rate=SAMPLE_RATE, mix="first") if c.beats
                else None)
        times["decode"] = time.perf_counter() - t
        self._print(f"[decode] {video}: {n} frames ({len(clip.frames)} at 1 fps)")

        t = time.perf_counter()
        tokens, counts, dino = [], None, []
        step = self.encode_chunk
        for s in range(0, n, step):
            pad = max(0, s + step - n)
            pw = ((0, pad), (0, 0), (0, 0), (0, 0))
            tk, ct, aux = self._encode(self.params, np.pad(sig_px[s:s + step], pw),
                                       np.pad(dino_px[s:s + step], pw),
                                       np.pad(sizes[s:s + step], ((0, pad), (0, 0)), "edge"))
            tokens.append(tk[:step - pad])
            dino.append(np.asarray(aux["dino_features"][:step - pad]))
            counts = ct[:1]
            self._print(f"[encode] {min(n, s + step)}/{n} frames")
        tokens = jnp.concatenate(tokens)[None]
        times["encode"] = time.perf_counter() - t

        t = time.perf_counter()
        layout = scene_split.scene_layout(np.concatenate(dino))
        sel = layout.selected_frame_indices
        tokens, stamps = tokens[:, sel], stamps[sel]
        starts = np.zeros((1, len(sel)), bool)
        starts[0, layout.split_points[:-1][layout.split_points[:-1] < len(sel)]] = True
        times["split"] = time.perf_counter() - t

        t = time.perf_counter()
        audio = None
        if self._audio is not None and wave is not None:
            audio = jnp.asarray(self._track_tokens(wave, stamps, clip.duration))[None]
        times["audio"] = time.perf_counter() - t

        t = time.perf_counter()
        ids = mask = None
        if c.compressor.text_input:
            enc = self.bert(question, truncation=True, max_length=QFORMER_TEXT_LEN)
            ids = np.asarray(enc["input_ids"], np.int32)[None]
            mask = np.ones(ids.shape, bool)
        n_max = qformer.max_video_tokens(  # static buffer size for any split
            len(sel), c.frame_slots, 0 if audio is None else audio.shape[2], c.compressor,
            max_segments=len(layout.segment_sizes))
        video_tokens, vmask, caux = self._compress(
            self.params, tokens, counts, np.ones((1, len(sel)), bool), starts, audio, ids, mask,
            n_max)
        nv = int(caux["num_tokens"][0])
        # The original's overflow rule: beyond max_context - 16 - text tokens, each chunk
        # loses its last tokens equally (`tdc.overflow_keep`).
        budget = c.max_context - tdc.INFERENCE_MAX_LENGTH - text_len
        kept = np.nonzero(np.asarray(tdc.overflow_keep(
            vmask, caux["token_frame"], caux["frame_token_lengths"], caux["is_static"],
            jnp.asarray([budget], jnp.int32)))[0])[0]
        if len(kept) < nv:
            self._print(f"[compress] {nv} video tokens trimmed per chunk to {len(kept)} "
                        f"(context {c.max_context})")
            video_tokens, nv = video_tokens[:, kept], len(kept)
        times["compress"] = time.perf_counter() - t
        self._print(f"[compress] {len(sel)} frames, {len(layout.segment_sizes)} segments -> "
                    f"{nv} video tokens")

        t = time.perf_counter()
        conv = [{"from": "human", "value": "<image>\n" + question}]
        prompt = chat.tokenize_conversation(conv, self.tok, template=self.template,
                                            num_video_tokens=nv, add_generation_prompt=True)
        prompt_ids = np.asarray(prompt["input_ids"], np.int32)[None]
        length = prompt_ids.shape[1]
        padded = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
        prompt_ids = np.pad(prompt_ids, ((0, 0), (0, padded - length)),
                            constant_values=pad_id(self.tok))
        embeds = self._splice(self.params, prompt_ids, video_tokens)[:, :length]
        text, res = generate_answer(self.params["llm"], c.llm, embeds, self.tok, self.stop_ids,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed, stream=stream)
        times["generate"] = time.perf_counter() - t
        out = res.sequences()[0]
        self._print(f"[generate] {len(out)} tokens; stage seconds " +
                    ", ".join(f"{k} {v:.2f}" for k, v in times.items()))
        return {"answer": text, "tokens": out, "frames": len(sel), "video_tokens": nv,
                "segments": len(layout.segment_sizes),
                "chunks": int(np.asarray(caux["is_static"]).sum()), "times": times,
                "video": np.asarray(video_tokens[0, :nv])}

    def _track_tokens(self, wave: np.ndarray, stamps: np.ndarray, duration: float
                      ) -> np.ndarray:
        """float32[F, 50, E]: each kept frame's audio tokens from the whole track, as the
        training step computes them (`TDCModel.frame_audio`: BEATs over TDC's 10 s windows,
        each second's 50 tokens, a frame's own and skipped seconds pooled to 50)."""
        c = self.config.beats
        feats, frames = fbank.tdc_window_fbanks(wave, sample_rate=SAMPLE_RATE,
                                                window_s=AUDIO_WINDOW_S)
        w = len(frames)
        seconds = min(int(np.ceil(duration - 1e-6)), AUDIO_WINDOW_S * w)
        sec_start, sec_count = (np.zeros((AUDIO_WINDOW_S * w,), np.int32) for _ in range(2))
        start, count = fbank.tdc_second_tokens((frames // c.patch_size) * c.mel_patches,
                                               c.num_tokens(feats.shape[1]), seconds,
                                               window_s=AUDIO_WINDOW_S)
        sec_start[:seconds], sec_count[:seconds] = start, count
        f_start, f_count = fbank.tdc_frame_seconds(fbank.kept_frame_seconds(stamps), sec_count)
        return np.asarray(self._audio(self.params, feats[None], frames[None], sec_start[None],
                                      sec_count[None], f_start[None], f_count[None]))[0]


def _splice(model: tdc.TDCModel, params, ids, video):
    from longvid_jax.models.video_llm import VIDEO_TOKEN_INDEX, splice_video_tokens

    def fwd(m):
        text = m.llm.embed(jnp.where(ids == VIDEO_TOKEN_INDEX, 0, ids))
        return splice_video_tokens(text, ids, video)

    return model.apply({"params": params}, method=fwd)



def main(argv) -> None:
    """`python -m longvid_jax.tdc_infer --checkpoint=DIR --video=FILE --question=...`."""
    del argv
    import sys

    from absl import flags

    from convert import tdc_keys
    from longvid_jax import xla_flags
    from longvid_jax.input import tokenizer as tokenizer_lib

    xla_flags.apply_defaults()  # before the backend starts
    f = flags.FLAGS
    params, configs = tdc_keys.load_orbax(f.checkpoint)
    bert = None
    if f.bert_vocab:
        bert = tokenizer_lib.wordpiece_tokenizer(f.bert_vocab)
    pred = TDCPredictor(params, configs, tokenizer_lib.load_tokenizer(f.tokenizer),
                        bert_tokenizer=bert, max_frames=f.max_frames, log=sys.stderr)
    out = pred.answer(f.video, f.question, max_new_tokens=f.max_new_tokens,
                      temperature=f.temperature, seed=f.seed)
    print(out["answer"])


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Orbax folder from `python -m convert.tdc_keys`.",
                        required=True)
    flags.DEFINE_string("video", None, "Video file.", required=True)
    flags.DEFINE_string("question", None, "Question about the video.", required=True)
    flags.DEFINE_string("tokenizer", "qwen2", "LLM tokenizer: 'qwen2' or a local HF folder "
                        "(Llama-3.2 for TDC-3B).")
    flags.DEFINE_string("bert_vocab", None, "bert-base-uncased vocab.txt (the Q-Former's text).")
    flags.DEFINE_integer("max_frames", 1000, "Frames decoded at most (1 fps).")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling temperature.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
