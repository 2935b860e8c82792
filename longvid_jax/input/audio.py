"""Audio features: Whisper's log-mel spectrogram and per-second windows aligned to video frames.

`log_mel_spectrogram` follows the NumPy path of `transformers.WhisperFeatureExtractor`
(`_np_extract_fbank_features`, itself OpenAI Whisper's `audio.log_mel_spectrogram`), without the
padding to 30 s. The slaney mel filter bank is computed here (the same formula as
`librosa.filters.mel(norm="slaney", htk=False)` and transformers' `mel_filter_bank`) because
importing librosa costs about a second in every worker process.

Letters: A audio frames (STFT hops), C mel bins, F video frames.
"""

import functools

import numpy as np

_LOG_FLOOR = 1e-10  # Whisper's clamp before log10
_DYNAMIC_RANGE = 8.0  # log10 units kept below the maximum


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels / 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    mel = hz / f_sp
    high = hz >= min_log_hz
    return np.where(high, min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
                    mel)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)),
                    f_sp * mel)


@functools.lru_cache(maxsize=16)
def mel_filters(num_mel_bins: int, sample_rate: int, n_fft: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters from 0 Hz to sample_rate / 2.

    Returns:
        float64[C, n_fft // 2 + 1]; read-only (cached).
    """
    fft_hz = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    mel_pts = np.linspace(
        _hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sample_rate / 2.0), num_mel_bins + 2
    )
    hz_pts = _mel_to_hz_slaney(mel_pts)
    widths = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]  # slaney: constant energy per filter
    weights.setflags(write=False)
    return weights


def _mel_power(waveform: np.ndarray, filters: np.ndarray, n_fft: int, hop_length: int,
               num_frames: int, block: int = 4096) -> np.ndarray:
    """Mel-filtered |STFT|^2 of the first `num_frames` frames: float64[C, num_frames].

    Centred, reflect-padded framing (torch.stft(center=True)) with a periodic Hann window,
    computed `block` frames at a time so an hour of audio needs only ~15 MB of scratch.
    """
    pad = n_fft // 2
    x = np.pad(waveform.astype(np.float64), pad, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop_length][:num_frames]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    out = np.empty((filters.shape[0], num_frames), np.float64)
    for start in range(0, num_frames, block):
        spec = np.fft.rfft(frames[start : start + block] * window, axis=-1)
        out[:, start : start + block] = filters @ (spec.real**2 + spec.imag**2).T
    return out


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
    filters = mel_filters(num_mel_bins, sample_rate, n_fft)
    mel = _mel_power(waveform, filters, n_fft, hop_length, num_frames)  # [C, A]
    log_spec = np.log10(np.maximum(mel, _LOG_FLOOR))
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
