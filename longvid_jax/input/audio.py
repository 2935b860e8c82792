"""Audio features: Whisper's log-mel spectrogram and per-second windows aligned to video frames.

`log_mel_spectrogram` follows the NumPy path of `transformers.WhisperFeatureExtractor`
(`_np_extract_fbank_features`, itself OpenAI Whisper's `audio.log_mel_spectrogram`), without the
padding to 30 s, built on `transformers.audio_utils` (`spectrogram`, `mel_filter_bank`).

Letters: A audio frames (STFT hops), C mel bins, F video frames.
"""

import functools

import numpy as np
from transformers import audio_utils

_LOG_FLOOR = 1e-10  # Whisper's clamp before log10
_DYNAMIC_RANGE = 8.0  # log10 units kept below the maximum


@functools.lru_cache(maxsize=16)
def mel_filters(num_mel_bins: int, sample_rate: int, n_fft: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters from 0 Hz to sample_rate / 2 (Whisper's).

    Returns:
        float64[n_fft // 2 + 1, C] (transformers' layout); read-only (cached).
    """
    weights = audio_utils.mel_filter_bank(
        num_frequency_bins=1 + n_fft // 2, num_mel_filters=num_mel_bins, min_frequency=0.0,
        max_frequency=sample_rate / 2.0, sampling_rate=sample_rate, norm="slaney",
        mel_scale="slaney")
    weights.setflags(write=False)
    return weights


def log_mel_spectrogram(
    waveform: np.ndarray,
    *,
    num_mel_bins: int = 128,
    sample_rate: int = 16000,
    n_fft: int = 400,
    hop_length: int = 160,
) -> np.ndarray:
    """Whisper's normalised log-mel spectrogram of a whole waveform.

    Recipe (WhisperFeatureExtractor's NumPy path): centred reflect-padded STFT with a periodic
    Hann window of `n_fft`, power 2, slaney mel filters (0 to sample_rate / 2 Hz), drop the last
    STFT frame, `log10(max(x, 1e-10))`, `max(x, x.max() - 8)` over the whole array, `(x + 4) / 4`.

    Args:
        waveform: float32[samples], mono, in [-1, 1], at `sample_rate`.
        num_mel_bins: C (80 for Whisper large-v2, 128 for large-v3).
        sample_rate: Hz.
        n_fft: STFT window and FFT size (samples).
        hop_length: STFT hop (samples); sample_rate / hop_length columns per second.

    Returns:
        float32[C, A] with A = samples // hop_length.

    Raises:
        ValueError: waveform not 1-D.
    """
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be 1-D, got shape {waveform.shape}")
    num_frames = waveform.shape[0] // hop_length
    if num_frames == 0:
        return np.zeros((num_mel_bins, 0), np.float32)
    if waveform.shape[0] <= n_fft // 2:  # too short to reflect-pad once: pad with zeros first
        waveform = np.pad(waveform, (0, n_fft // 2 + 1 - waveform.shape[0]))
    log_spec = audio_utils.spectrogram(
        waveform.astype(np.float32), audio_utils.window_function(n_fft, "hann"),
        frame_length=n_fft, hop_length=hop_length, power=2.0,
        mel_filters=mel_filters(num_mel_bins, sample_rate, n_fft), log_mel="log10",
        mel_floor=_LOG_FLOOR)[:, :num_frames]  # Whisper drops the last STFT frame
    log_spec = np.maximum(log_spec, log_spec.max() - _DYNAMIC_RANGE)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def silence_value() -> float:
    """The log-mel of an all-zero waveform (every bin): (log10(1e-10) + 4) / 4 = -1.5."""
    return float((np.log10(_LOG_FLOOR) + 4.0) / 4.0)


def per_second_features(
    waveform: np.ndarray | None,
    timestamps: np.ndarray,
    duration: float,
    *,
    num_mel_bins: int = 128,
    frames_per_second: int = 100,
    sample_rate: int = 16000,
    n_fft: int = 400,
    hop_length: int = 160,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel windows of `frames_per_second` columns (1 s by default), one per video frame.

    Definition: the whole waveform's `log_mel_spectrogram` is computed once (so the
    `max - 8` clamp is over the whole clip, and the STFT is centred only at the clip's ends);
    frame i gets columns `[c_i, c_i + frames_per_second)` with
    `c_i = round(timestamps[i] * sample_rate / hop_length)`. Columns that lie beyond the audio
    (or at/after the video's `duration`), and all columns when there is no audio track, hold
    the features of silence, `silence_value()` = -1.5 (the same recipe applied to zeros).
    `has_audio[i]` is False exactly when window i has no real audio column at all.

    Args:
        waveform: float32[samples] mono at `sample_rate`, or None (no audio track).
        timestamps: float32[F] frame times in seconds.
        duration: the video's duration in seconds; audio after it is ignored.
        num_mel_bins: C.
        frames_per_second: window width in columns (100 = 1 s at 16 kHz / hop 160).
        sample_rate, n_fft, hop_length: as in `log_mel_spectrogram`.

    Returns:
        (features float32[F, C, frames_per_second], has_audio bool[F]).
    """
    timestamps = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    num = timestamps.shape[0]
    feats = np.full((num, num_mel_bins, frames_per_second), silence_value(), np.float32)
    has_audio = np.zeros((num,), bool)
    if waveform is None or np.asarray(waveform).shape[0] < hop_length:
        return feats, has_audio
    spec = log_mel_spectrogram(
        waveform,
        num_mel_bins=num_mel_bins,
        sample_rate=sample_rate,
        n_fft=n_fft,
        hop_length=hop_length,
    )
    cols_per_s = sample_rate / hop_length
    end = min(spec.shape[1], int(np.ceil(duration * cols_per_s - 1e-6)))
    for i, t in enumerate(timestamps):
        start = max(0, int(round(t * cols_per_s)))
        stop = min(end, start + frames_per_second)
        if stop > start:
            feats[i, :, : stop - start] = spec[:, start:stop]
            has_audio[i] = True
    return feats, has_audio
