"""`longvid_jax/input/fbank.py` against the originals' torchaudio Kaldi fbank and chunking
(`shared/fixtures/beats_tiny` and the BEATs part of `longvale_feature_pooling`)."""

import numpy as np
import pytest

from longvid_jax.input import fbank

TOL = 1e-4  # normalised fbank; measured 2.1e-5 (beats_tiny), 3.0e-5 and 4.6e-5 (LongVALE)


@pytest.fixture(scope="module")
def beats_io(fixtures_dir):
    return dict(np.load(fixtures_dir / "beats_tiny" / "io.npz"))


@pytest.fixture(scope="module")
def longvale_io(fixtures_dir):
    return dict(np.load(fixtures_dir / "longvale_feature_pooling" / "io.npz"))


def test_beats_fbank_matches_torchaudio(beats_io):
    got = fbank.beats_fbank(beats_io["waveform"])  # [1, 32000] -> [1, 198, 128]
    assert got.shape == beats_io["fbank"].shape == (1, 198, 128) and got.dtype == np.float32
    assert np.max(np.abs(got - beats_io["fbank"])) < TOL


@pytest.mark.parametrize("case", ["a5p5s", "b2p7s"])
def test_longvale_fbank_and_chunks(longvale_io, case):
    wav = longvale_io[f"{case}_waveform"][0]
    want = longvale_io[f"{case}_fbank"]
    got = fbank.beats_fbank(wav)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) < TOL
    chunks = fbank.longvale_chunks(want)
    np.testing.assert_array_equal(chunks, longvale_io[f"{case}_chunks"])


def test_frame_and_chunk_counts_match_longvale_table(longvale_io):
    for samples, frames, chunks in longvale_io["beats_table_samples_fbankframes_nchunks"]:
        assert fbank.num_fbank_frames(int(samples)) == frames
        feats = np.ones((int(frames), 128), np.float32)
        if chunks == 0:
            with pytest.raises(ValueError, match="no 512-frame chunk"):
                fbank.longvale_chunks(feats)
        else:
            out = fbank.longvale_chunks(feats)
            assert out.shape == (chunks, 512, 128)
            # Real rows first, then zero rows (the padding of the last chunk).
            real = min(int(frames), chunks * 512)
            assert out.reshape(-1, 128)[:real].min() == 1.0
            assert not out.reshape(-1, 128)[real:].any()


def test_longvale_training_mode_pads_or_truncates():
    feats = np.random.default_rng(0).normal(size=(700, 128)).astype(np.float32)
    two = fbank.longvale_chunks(feats, n_frames=2)
    assert two.shape == (2, 512, 128)
    np.testing.assert_array_equal(two.reshape(-1, 128)[:700], feats)
    assert not two.reshape(-1, 128)[700:].any()
    one = fbank.longvale_chunks(feats, n_frames=1)
    np.testing.assert_array_equal(one[0], feats[:512])


def test_kaldi_fbank_shapes_batch_and_errors(beats_io):
    wav = beats_io["waveform"][0]
    rng = np.random.default_rng(3)
    other = np.clip(0.1 * rng.normal(size=wav.shape), -1, 1).astype(np.float32)
    batch = fbank.beats_fbank(np.stack([wav, other]))
    assert batch.shape == (2, 198, 128)
    np.testing.assert_array_equal(batch[1], fbank.beats_fbank(other))
    assert fbank.kaldi_fbank(np.zeros(399, np.float32)).shape == (0, 128)
    assert fbank.kaldi_fbank(np.ones(400, np.float32) * 1000).shape == (1, 128)
    assert fbank.num_fbank_frames(399) == 0 and fbank.num_fbank_frames(400) == 1
    with pytest.raises(ValueError, match="1-D"):
        fbank.kaldi_fbank(np.zeros((2, 400)))
    with pytest.raises(ValueError, match="samples"):
        fbank.beats_fbank(np.zeros((1, 2, 400)))


def test_tdc_windows():
    sr = 16000
    assert fbank.tdc_windows(sr // 2) == []
    assert fbank.tdc_windows(10 * sr + sr // 2) == [(0, 10 * sr)]  # the 0.5 s tail is dropped
    assert fbank.tdc_windows(15 * sr + sr // 2) == [(0, 10 * sr), (10 * sr, 15 * sr + sr // 2)]
    assert fbank.tdc_windows(20 * sr) == [(0, 10 * sr), (10 * sr, 20 * sr)]
    assert fbank.num_fbank_frames(10 * sr) == 998  # -> 62 x 8 = 496 BEATs tokens
