"""Whisper log-mel parity with transformers, and per-second windows aligned to frames."""

import numpy as np
import pytest
import transformers

from longvid_jax.input import audio, decode


@pytest.mark.parametrize("bins", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(bins):
    rng = np.random.default_rng(bins)
    wave = (0.1 * rng.standard_normal(30 * 16000)).astype(np.float32)  # exactly 30 s
    wave[16000:32000] *= 5.0  # some dynamic range so the max - 8 clamp is exercised
    extractor = transformers.WhisperFeatureExtractor(feature_size=bins)
    want = extractor(wave, sampling_rate=16000, return_tensors="np")["input_features"][0]
    got = audio.log_mel_spectrogram(wave, num_mel_bins=bins)
    assert got.shape == want.shape == (bins, 3000) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4


def test_log_mel_lengths_and_silence():
    rng = np.random.default_rng(0)
    for n in (16037, 161, 399, 200):
        spec = audio.log_mel_spectrogram(rng.uniform(-1, 1, n).astype(np.float32), num_mel_bins=8)
        assert spec.shape == (8, n // 160)
    assert audio.log_mel_spectrogram(np.zeros(100, np.float32), num_mel_bins=8).shape == (8, 0)
    zeros = audio.log_mel_spectrogram(np.zeros(1600, np.float32), num_mel_bins=8)
    np.testing.assert_array_equal(zeros, np.full((8, 10), -1.5, np.float32))
    assert audio.silence_value() == -1.5
    with pytest.raises(ValueError, match="1-D"):
        audio.log_mel_spectrogram(np.zeros((2, 1600), np.float32))


def test_per_second_windows_are_slices_of_the_whole_clip(media_dir):
    """movie-hello: 8.3 s video, 8.32 s of speech/keyboard audio; frames at 0..8 s."""
    wave = decode.load_audio(media_dir / "movie-hello.mp4")
    full = audio.log_mel_spectrogram(wave, num_mel_bins=16)  # [16, 832]
    timestamps = np.arange(9, dtype=np.float32)
    feats, has_audio = audio.per_second_features(wave, timestamps, 8.3, num_mel_bins=16)
    assert feats.shape == (9, 16, 100) and feats.dtype == np.float32
    assert has_audio.all()
    for k in range(8):
        np.testing.assert_array_equal(feats[k], full[:, 100 * k : 100 * k + 100])
    # Second 8 holds columns 800..829 (the video ends at 8.3 s), then silence.
    np.testing.assert_array_equal(feats[8, :, :30], full[:, 800:830])
    assert (feats[8, :, 30:] == -1.5).all()
    assert feats[:8].std() > 0.1  # real sound, not silence


def test_per_second_windows_beyond_audio_and_without_audio():
    wave = np.random.default_rng(1).uniform(-0.5, 0.5, 25000).astype(np.float32)  # 1.5625 s
    feats, has = audio.per_second_features(wave, np.array([0.0, 1.0, 2.0]), 3.0, num_mel_bins=4)
    assert has.tolist() == [True, True, False]
    assert (feats[1, :, 56:] == -1.5).all() and (feats[1, :, :56] != -1.5).any()
    assert (feats[2] == -1.5).all()
    feats, has = audio.per_second_features(None, np.array([0.0, 1.0]), 2.0, num_mel_bins=4)
    assert feats.shape == (2, 4, 100) and (feats == -1.5).all() and not has.any()


def test_cockatoo_audio_features(media_dir, cockatoo_clip):
    """cockatoo's mp3 track exists (13.9 s) but is digital silence: features of silence."""
    wave = decode.load_audio(media_dir / "cockatoo.mp4")
    feats, has = audio.per_second_features(
        wave, cockatoo_clip.timestamps, cockatoo_clip.duration, num_mel_bins=16
    )
    assert feats.shape == (14, 16, 100) and has.all()
    full = audio.log_mel_spectrogram(wave, num_mel_bins=16)
    for k in range(13):
        np.testing.assert_array_equal(feats[k], full[:, 100 * k : 100 * k + 100])
