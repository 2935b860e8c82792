"""Kaldi log-mel filter banks for BEATs, and the ways TDC and LongVALE cut audio for it.

`kaldi_fbank` is Kaldi's `compute-fbank-feats` (= `torchaudio.compliance.kaldi.fbank`, which
the originals call) computed by the `kaldi-native-fbank` package (C++, no torch). Frames of
`frame_length_ms` every `frame_shift_ms`; per frame: remove the DC offset, pre-emphasis, window
(povey), zero-pad to a power of two, power spectrum, triangular mel filters on Kaldi's mel scale
`1127 ln(1 + f / 700)` from `low_freq` to the Nyquist frequency, `log(max(x, float32 eps))`.
setup.cfg pins kaldi-native-fbank below 1.23: 1.23 refuses 128 mel bins on a 512-point FFT at
16 kHz ("num_mel_bins too large", as Kaldi itself does), which torchaudio, and so BEATs, accepts.

`beats_fbank` is BEATs' `preprocess` (microsoft/unilm `beats/BEATs.py`; TDC
`tdc/audio_models/beats/BEATs.py`; LongVALE `mm_utils.BEATSAudioExtractor`): the waveform in
[-1, 1] is scaled by 2^15 (16-bit PCM units), 128 mel bins at 16 kHz, 25 ms / 10 ms, dither 0,
then `(x - 15.41663) / (2 * 6.55582)`.

Against the originals' torchaudio fbank (the waveforms of `shared/fixtures/beats_tiny` and
`longvale_feature_pooling`): max abs error 4.6e-5 on the normalised features (6e-4 on the raw log
energies, which reach about 20), always in the lowest mel bin, whose energy is small; both are
float32 FFT pipelines, each within 5e-5 of a float64 evaluation of the same recipe.

Letters: A fbank frames (100 per second), C mel bins.
"""

import math

import kaldi_native_fbank as knf
import numpy as np

BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582
PCM_SCALE = 2.0**15  # BEATs feeds 16-bit PCM magnitudes to the fbank


def num_fbank_frames(num_samples: int, *, sample_rate: int = 16000,
                     frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> int:
    """Frames `kaldi_fbank` gives for `num_samples` samples (snip_edges=True).

    `1 + (num_samples - window) // shift` with window = 400 and shift = 160 samples at 16 kHz,
    0 when `num_samples < window` (e.g. 32000 samples -> 198 frames).
    """
    window = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def kaldi_fbank(
    waveform: np.ndarray,
    *,
    num_mel_bins: int = 128,
    sample_rate: int = 16000,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    dither: float = 0.0,
    preemphasis: float = 0.97,
    remove_dc_offset: bool = True,
    window_type: str = "povey",
    round_to_power_of_two: bool = True,
    snip_edges: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> np.ndarray:
    """Kaldi log-mel filter-bank energies of one waveform (`torchaudio.compliance.kaldi.fbank`).

    Defaults are torchaudio's, except `dither` (torchaudio's default is also 0.0; Kaldi's own
    binary uses 1.0) and the BEATs sizes (128 bins, 16 kHz). No energy column
    (`use_energy=False`), log of the power spectrum (`use_log_fbank`, `use_power`).

    Args:
      waveform: float[samples], mono, in the units the features expect (BEATs: PCM16 scale,
        see `beats_fbank`).
      num_mel_bins: C.
      sample_rate: Hz.
      frame_length_ms, frame_shift_ms: window and hop (ms).
      dither: Gaussian dither amplitude (0 = deterministic).
      preemphasis: coefficient of `x[t] - c * x[t - 1]`.
      remove_dc_offset: subtract each frame's mean first.
      window_type: `"povey"`, `"hamming"`, `"hanning"`, `"rectangular"`, `"sine"` or
        `"blackman"`.
      round_to_power_of_two: FFT size = next power of two of the window (512 for 400).
      snip_edges: only frames that fit entirely in the signal (see `num_fbank_frames`).
      low_freq, high_freq: mel range in Hz; `high_freq <= 0` is an offset from Nyquist.

    Returns:
      float32[A, C] (A = `num_fbank_frames(len(waveform))` with snip_edges; `[0, C]` when the
      waveform is shorter than one window).

    Raises:
      ValueError: if the waveform is not 1-D.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be 1-D, got shape {waveform.shape}")
    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq = float(sample_rate)
    frame.frame_length_ms = float(frame_length_ms)
    frame.frame_shift_ms = float(frame_shift_ms)
    frame.dither = float(dither)
    frame.preemph_coeff = float(preemphasis)
    frame.remove_dc_offset = bool(remove_dc_offset)
    frame.window_type = window_type
    frame.round_to_power_of_two = bool(round_to_power_of_two)
    frame.snip_edges = bool(snip_edges)
    opts.mel_opts.num_bins = int(num_mel_bins)
    opts.mel_opts.low_freq = float(low_freq)
    opts.mel_opts.high_freq = float(high_freq)
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(float(sample_rate), waveform)
    computer.input_finished()
    n = computer.num_frames_ready
    if n == 0:
        return np.zeros((0, num_mel_bins), np.float32)
    return np.stack([computer.get_frame(i) for i in range(n)]).astype(np.float32, copy=False)


def beats_fbank(waveform: np.ndarray, *, sample_rate: int = 16000,
                mean: float = BEATS_FBANK_MEAN, std: float = BEATS_FBANK_STD) -> np.ndarray:
    """BEATs' normalised fbank of a waveform (or of each row of a batch of equal length).

    `kaldi_fbank(waveform * 2^15, num_mel_bins=128)`, then `(x - mean) / (2 * std)`.

    Args:
      waveform: float[samples] or float[B, samples], mono, in [-1, 1], at 16 kHz.
      sample_rate: Hz (the released BEATs models were trained at 16 kHz only).
      mean, std: BEATs' AudioSet fbank statistics.

    Returns:
      float32[A, 128] or float32[B, A, 128], A = `num_fbank_frames(samples)`, the input of
      `models.beats.BEATs`.

    Raises:
      ValueError: if the waveform is not 1-D or 2-D.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim not in (1, 2):
        raise ValueError(f"waveform must be [samples] or [B, samples], got {waveform.shape}")
    rows = waveform.reshape(-1, waveform.shape[-1])
    feats = np.stack([kaldi_fbank(row * np.float32(PCM_SCALE), sample_rate=sample_rate)
                      for row in rows])
    feats = (feats - np.float32(mean)) / np.float32(2.0 * std)
    return feats.reshape(waveform.shape[:-1] + feats.shape[1:]).astype(np.float32, copy=False)


def tdc_windows(num_samples: int, *, sample_rate: int = 16000,
                window_s: int = 10) -> list[tuple[int, int]]:
    """The waveform windows TDC encodes with BEATs, as `(start, stop)` sample indices.

    TDC (`cambrian_arch.py`, `prepare_inputs_labels_for_multimodal`) runs BEATs on
    `wav[16000 k : 16000 (k + 10)]` for `k in range(0, int(seconds), 10)`: whole seconds only,
    so a tail shorter than one second is dropped when it would start a new window (10.5 s ->
    one window of 10 s; 15.5 s -> [0, 10 s) and [10 s, 15.5 s)). Each window gets its own
    `beats_fbank`, giving about 50 BEATs tokens per second (496 for 10 s); see
    `tdc_window_fbanks`.

    Returns:
      Windows in order; empty for audio shorter than one second.
    """
    seconds = num_samples // sample_rate
    return [(k * sample_rate, min(num_samples, (k + window_s) * sample_rate))
            for k in range(0, seconds, window_s)]


TDC_TOKENS_PER_SECOND = 50  # BEATs tokens TDC gives each second of a window


def tdc_window_fbanks(waveform: np.ndarray, *, sample_rate: int = 16000, window_s: int = 10,
                      max_windows: int | None = None, max_frames: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """BEATs fbank of TDC's audio windows (`tdc_windows`), each zero-padded to one length.

    As the original feeds BEATs: audio shorter than 1 s is first padded with silence to 1 s
    (`AudioProcessor.load_audio_file`), and the waveform is rounded to float16 (its
    `batch_collate` stores it so). Each window gets its own `beats_fbank`; the last one is
    usually shorter. Its rows are padded with zeros to `max_frames`, and
    `models.beats.token_valid(frames, ...)` masks the padding, so BEATs gives each window's real
    tokens exactly as the shorter window alone (`models.beats.BEATs`' `valid`).

    Args:
      waveform: float[samples] mono in [-1, 1] at `sample_rate` (16 kHz for BEATs).
      sample_rate: Hz.
      window_s: window length in seconds (10).
      max_windows: keep at most this many windows (the rest is never computed).
      max_frames: A, fbank rows per window (default that of a full window: 998 at 16 kHz).

    Returns:
      (fbank float32[W, A, 128], frames int32[W] real rows of each window), W >= 1.

    Raises:
      ValueError: if the waveform is not 1-D.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be 1-D, got shape {waveform.shape}")
    if len(waveform) < sample_rate:
        waveform = np.pad(waveform, (0, sample_rate - len(waveform)))
    waveform = waveform.astype(np.float16).astype(np.float32)
    windows = tdc_windows(len(waveform), sample_rate=sample_rate, window_s=window_s)
    windows = windows[:max_windows] if max_windows else windows
    if max_frames is None:
        max_frames = num_fbank_frames(window_s * sample_rate, sample_rate=sample_rate)
    out = np.zeros((len(windows), max_frames, 128), np.float32)
    frames = np.zeros((len(windows),), np.int32)
    for i, (lo, hi) in enumerate(windows):
        feats = beats_fbank(waveform[lo:hi], sample_rate=sample_rate)[:max_frames]
        out[i, :len(feats)], frames[i] = feats, len(feats)
    return out, frames


def tdc_second_tokens(window_tokens: np.ndarray, tokens_per_window: int, num_seconds: int, *,
                      window_s: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Each video second's BEATs tokens under TDC's rule (`cambrian_arch.py`,
    `prepare_inputs_labels_for_multimodal`, the BEATs branch).

    Second `s` lies in window `w = s // 10` at index `i = s % 10` and takes that window's
    tokens `[50 i, min(50 i + 50, n_w))` in their time-major order (flat 50-token slices, not
    aligned to BEATs' 8-token time steps: a full 10 s window has 496 tokens, so its second 9
    gets 46); none when the slice is empty (past the window's audio) or the window does not
    exist. TDC pools a slice of fewer than 50 tokens up to 50 (`adaptive_avg_pool2d`), see
    `models.tdc.tdc_frame_audio`.

    Args:
      window_tokens: int[W] real tokens of each window (`BEATsConfig.num_tokens(frames)`).
      tokens_per_window: token slots of each window in the flat layout (window w's tokens
        start at `w * tokens_per_window`).
      num_seconds: S, the video's seconds (its 1-fps frames before any subsampling: the length
        of the original's `sample_indices`); seconds past the audio get none.

    Returns:
      (start int32[S], count int32[S]) into the flat token layout.
    """
    window_tokens = np.asarray(window_tokens, np.int64).reshape(-1)
    s = np.arange(num_seconds)
    w, i = s // window_s, s % window_s
    n = np.where(w < len(window_tokens), window_tokens[np.minimum(w, len(window_tokens) - 1)], 0)
    lo = TDC_TOKENS_PER_SECOND * i
    count = np.clip(np.minimum(lo + TDC_TOKENS_PER_SECOND, n) - lo, 0, None)
    start = np.where(count > 0, w * tokens_per_window + lo, 0)
    return start.astype(np.int32), count.astype(np.int32)


def kept_frame_seconds(timestamps: np.ndarray, fps: float = 1.0) -> np.ndarray:
    """The kept frames' indices among the video's frames at `fps` (TDC's `sample_indices`
    positions; seconds at 1 fps): `round(t * fps)`, made strictly increasing (a video whose
    native rate is below `fps` gives one decoded frame, and time, to several candidates).

    Args:
      timestamps: float[F] the kept frames' times in seconds, non-decreasing.

    Returns:
      int64[F] strictly increasing.
    """
    r = np.round(np.asarray(timestamps, np.float64).reshape(-1) * fps).astype(np.int64)
    i = np.arange(len(r))
    return i + np.maximum.accumulate(r - i) if len(r) else r


def tdc_frame_seconds(frame_seconds: np.ndarray, second_count: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The seconds whose audio each kept frame pools (TDC's `sample_indices` loop), as a range
    of the per-second token blocks (50 per second, `tdc_second_tokens` pooled to 50 each).

    Frame i (at 1-fps index `frame_seconds[i]`) takes its own second and the seconds skipped
    after it, up to the next kept frame's second (the last frame: to the end of the audio);
    seconds without tokens add nothing, and a frame whose second has none gets none (the
    original pads the missing frames' audio with zeros).

    Args:
      frame_seconds: int[F] strictly increasing 1-fps indices of the kept frames.
      second_count: int[S] tokens of each second (`tdc_second_tokens`); the seconds with tokens
        form a prefix (audio stops, it does not pause).

    Returns:
      (start int32[F], count int32[F]) in per-second block tokens: frame i pools blocks
      `[start / 50, (start + count) / 50)`.

    Raises:
      ValueError: if the frame seconds are not strictly increasing.
    """
    j = np.asarray(frame_seconds, np.int64).reshape(-1)
    if np.any(np.diff(j) <= 0):
        raise ValueError(f"frame seconds must be strictly increasing, got {j.tolist()}")
    audible = int(np.count_nonzero(np.asarray(second_count) > 0))
    lo = np.minimum(j, audible)
    hi = np.minimum(np.append(j[1:], audible), audible)
    per = TDC_TOKENS_PER_SECOND
    return (per * lo).astype(np.int32), (per * np.maximum(hi - lo, 0)).astype(np.int32)


def longvale_chunks(fbank: np.ndarray, *, frame_length: int = 512,
                    n_frames: int | None = None) -> np.ndarray:
    """LongVALE's 5.12 s BEATs chunks of one clip's fbank (`BEATSAudioExtractor.extract`).

    Eval mode (`n_frames=None`, `is_eval=True`, how LongVALE extracts its features): the fbank
    is padded at the end with `A mod frame_length` zero rows (zeros of the *normalised*
    features), then cut into `floor(padded / frame_length)` chunks. So the chunk count is
    `A / frame_length` rounded half up: a remainder r < 256 is dropped, r >= 256 becomes a last
    chunk holding r real rows and zeros after them. Training mode (`n_frames` given): pad with
    zeros or truncate to exactly `n_frames` chunks.

    Each chunk goes through BEATs alone; LongVALE keeps the mean over its tokens
    (`models.beats.mean_pool`), one 768-d vector per 5.12 s.

    Args:
      fbank: float32[A, C], `beats_fbank` of the clip.
      frame_length: rows per chunk (512 = 5.12 s).
      n_frames: chunks in training mode; None for eval mode.

    Returns:
      float32[N, frame_length, C].

    Raises:
      ValueError: in eval mode when no chunk results (A < frame_length / 2, audio shorter than
        about 2.57 s), where the original fails in `torch.cat([])`.
    """
    fbank = np.asarray(fbank, dtype=np.float32)
    if fbank.ndim != 2:
        raise ValueError(f"fbank must be [A, C], got shape {fbank.shape}")
    a, c = fbank.shape
    if n_frames is None:
        padded = a + a % frame_length
        count = padded // frame_length
        if count == 0:
            raise ValueError(f"{a} fbank frames give no {frame_length}-frame chunk (LongVALE "
                             f"needs at least {math.ceil(frame_length / 2)})")
    else:
        count = n_frames
        padded = n_frames * frame_length
    out = np.zeros((padded, c), np.float32)
    out[:min(a, padded)] = fbank[:padded]
    return out[:count * frame_length].reshape(count, frame_length, c)
