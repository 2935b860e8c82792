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
    `beats_fbank`, giving about 50 BEATs tokens per second (496 for 10 s). Note that TDC's
    audio processor stores the waveform as float16 (`batch_collate`) before BEATs casts it back
    to float32; round it the same way (`wav.astype(np.float16).astype(np.float32)`) to match
    TDC's features bit for bit.

    Returns:
      Windows in order; empty for audio shorter than one second.
    """
    seconds = num_samples // sample_rate
    return [(k * sample_rate, min(num_samples, (k + window_s) * sample_rate))
            for k in range(0, seconds, window_s)]


def tdc_fbank_windows(waveform: np.ndarray, *, sample_rate: int = 16000,
                      window_s: int = 10) -> np.ndarray:
    """BEATs fbank of a whole track in 10 s windows of equal length, as longvid_jax's TDC
    encodes audio (`tdc_infer.TDCPredictor` and the training pipeline): the waveform is
    zero-padded to a whole number of windows (at least one), each window gets its own
    `beats_fbank`. Unlike the original's `tdc_windows` (whole seconds only, a shorter last
    window) every window has the same `num_fbank_frames(window_s * sample_rate)` frames (998 at
    16 kHz), so a batch of windows has a static shape; the padding is silence.

    Args:
      waveform: float[samples] mono in [-1, 1] at `sample_rate` (16 kHz for BEATs).
      sample_rate: Hz.
      window_s: window length in seconds.

    Returns:
      float32[W, A, 128] with W = max(1, ceil(samples / (window_s * sample_rate))).

    Raises:
      ValueError: if the waveform is not 1-D.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be 1-D, got shape {waveform.shape}")
    win = window_s * sample_rate
    n_win = max(1, -(-len(waveform) // win))
    padded = np.pad(waveform, (0, n_win * win - len(waveform)))
    return beats_fbank(padded.reshape(n_win, win), sample_rate=sample_rate)


def beats_step_seconds(fbank_frames: int, patch_size: int, window_s: int = 10
                       ) -> tuple[int, float]:
    """(BEATs time steps per window, seconds per time step) of `tdc_fbank_windows` windows of
    `fbank_frames` frames: BEATs patches `patch_size` fbank frames per step (the remainder
    dropped by its stride-16 convolution); a step lasts `window_s / (fbank_frames /
    patch_size)` s (998 frames, 16: 62 steps of 0.1603 s), as `tdc_infer` has always counted."""
    return fbank_frames // patch_size, window_s / (fbank_frames / patch_size)


def tdc_frame_audio_steps(times: np.ndarray, num_steps: int, seconds_per_step: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The BEATs time steps each kept frame pools into its audio tokens (TDC's rule as read by
    longvid_jax: `tdc_infer` and the training pipeline both use this).

    Step t belongs to second `floor(t * seconds_per_step)`. Frame i (at `times[i]`) takes the
    steps whose second lies in `[floor(times[i]), floor(times[i + 1]))`, i.e. its own second
    and the seconds skipped before the next kept frame; at least its own second (two frames in
    one second share it); the last frame takes everything from its second to the end of the
    track. Seconds are monotone in t, so each frame's steps form one range.

    Args:
      times: float[F] kept frame times in seconds, increasing.
      num_steps: time steps of the whole track (windows x steps per window).
      seconds_per_step: seconds per time step (`beats_step_seconds`).

    Returns:
      (start int32[F], count int32[F]): frame i owns steps `[start, start + count)`; count 0
      when the track ends before the frame's second.
    """
    second = np.floor(np.arange(num_steps) * seconds_per_step + 1e-9)
    lo = np.floor(np.asarray(times, np.float64).reshape(-1))
    hi = np.maximum(np.append(lo[1:], np.inf), lo + 1)
    start = np.searchsorted(second, lo, side="left")
    stop = np.searchsorted(second, hi, side="left")
    return start.astype(np.int32), np.maximum(stop - start, 0).astype(np.int32)


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
