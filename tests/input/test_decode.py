"""Video and audio decoding on the real clips of shared/media, and on broken files."""

import pickle

import av
import numpy as np
import pytest
from scipy import signal

from longvid_jax.input import decode


def test_cockatoo_one_fps(cockatoo_clip):
    clip = cockatoo_clip
    assert clip.frames.shape == (14, 32, 32, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_allclose(clip.timestamps, np.arange(14), atol=1e-6)
    assert clip.timestamps.dtype == np.float32
    assert clip.duration == pytest.approx(14.0)
    assert clip.native_fps == pytest.approx(20.0)
    # 1280x720 -> 32x18, centred in 32x32: rows 0..6 and 25..31 are the fill colour.
    fill = np.array([10, 20, 30], np.uint8)
    assert (clip.frames[:, :7] == fill).all() and (clip.frames[:, 25:] == fill).all()
    assert not (clip.frames[:, 7:25] == fill).all(axis=-1).any(axis=(1, 2)).all()
    assert clip.frames[:, 7:25].std() > 10  # real picture content


def test_cockatoo_frame_cap(media_dir, cockatoo_clip):
    clip = decode.load_video(media_dir / "cockatoo.mp4", max_frames=8, size=32, fill=(10, 20, 30))
    chosen = np.linspace(0, 13, 8).round().astype(int)  # TDC-style uniform pick of 14 candidates
    assert clip.frames.shape[0] == 8
    np.testing.assert_allclose(clip.timestamps, chosen, atol=1e-6)
    np.testing.assert_array_equal(clip.frames, cockatoo_clip.frames[chosen])


def test_fractional_duration_and_native_size(media_dir):
    hello = decode.load_video(media_dir / "movie-hello.mp4", size=32)  # 8.3 s -> 9 frames
    assert hello.frames.shape == (9, 32, 32, 3)
    np.testing.assert_allclose(hello.timestamps, np.arange(9), atol=0.02)
    short = decode.load_video(media_dir / "realshort.mp4", size=None, pad_to_square=False)
    assert short.frames.shape == (2, 240, 320, 3)  # 1.2 s at 1 fps: t = 0, 1
    square = decode.load_video(media_dir / "realshort.mp4", size=None, fill=(1, 2, 3))
    assert square.frames.shape == (2, 320, 320, 3)
    np.testing.assert_array_equal(square.frames[:, 40:280], short.frames)
    assert (square.frames[:, :40] == [1, 2, 3]).all()


def test_decord_resize_bug_fallback(media_dir):
    """decord fails on widths dividing 48; the PyAV-resize fallback gives the same picture."""
    small = decode.load_video(media_dir / "realshort.mp4", size=16, pad_to_square=False)
    assert small.frames.shape == (2, 12, 16, 3)
    ok = decode.load_video(media_dir / "realshort.mp4", size=20, pad_to_square=False)
    assert ok.frames.shape == (2, 15, 20, 3)
    assert abs(float(small.frames.mean()) - float(ok.frames.mean())) < 3


def test_sample_indices_nearest_and_cap():
    times = np.arange(300) / 29.97
    idx = decode.sample_indices(times, 300 / 29.97, fps=1.0, max_frames=64)
    assert idx.tolist() == [min(round(i * 29.97), 299) for i in range(11)]  # t=10: last frame
    idx = decode.sample_indices(times, 300 / 29.97, fps=2.0, max_frames=5)
    candidates = np.arange(21) / 2.0
    want = np.abs(times[None] - candidates[np.linspace(0, 20, 5).round().astype(int), None])
    assert idx.tolist() == want.argmin(1).tolist()
    idx = decode.sample_indices(times, 300 / 29.97, fps=2.0, max_frames=5, subsample="floor")
    want = np.abs(times[None] - candidates[[0, 4, 8, 12, 16], None])  # int(i * 21 / 5)
    assert idx.tolist() == want.argmin(1).tolist()
    with pytest.raises(ValueError, match="subsample"):
        decode.sample_indices(times, 10.0, fps=1.0, max_frames=5, subsample="random")


def test_expand2square_centres():
    frames = np.full((1, 2, 5, 3), 7, np.uint8)
    out = decode.expand2square(frames, (1, 2, 3))
    assert out.shape == (1, 5, 5, 3)
    assert (out[0, 1:3] == 7).all() and (out[0, [0, 3, 4]] == [1, 2, 3]).all()
    tall = decode.expand2square(np.full((1, 4, 1, 3), 9, np.uint8), (0, 0, 0))
    assert (tall[0, :, 1] == 9).all() and (tall[0, :, [0, 2, 3]] == 0).all()


def _truncated(src, dst, fraction):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _header_only(dst):
    """An mp4 with a video stream declared but no frame written."""
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    return dst


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "header_only", "trunc_moov_end",
                                  "trunc_moov_front", "trunc_partial"])
def test_bad_videos_raise_naming_the_file(kind, tmp_path, media_dir):
    path = tmp_path / f"bad_{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "header_only":
        _header_only(path)
    elif kind == "trunc_moov_end":  # cockatoo's index is at the end: half a file cannot open
        _truncated(media_dir / "realshort.mp4", path, 0.5)
    elif kind == "trunc_moov_front":  # index at the front, half the data missing
        _truncated(media_dir / "movie-hello.mp4", path, 0.5)
    elif kind == "trunc_partial":  # opens with 241 of 250 frames: must still be detected
        _truncated(media_dir / "movie-hello.mp4", path, 0.99)
    with pytest.raises(decode.VideoDecodeError, match=f"bad_{kind}.mp4") as err:
        decode.load_video(path, size=32, max_frames=4)
    assert isinstance(err.value, ValueError) and err.value.path == str(path)
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)
    if kind in ("missing", "empty", "text", "trunc_moov_front"):
        with pytest.raises(decode.VideoDecodeError, match=f"bad_{kind}.mp4"):
            decode.load_audio(path)


def _stereo_48k(path):
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=-1)


def test_audio_stereo_48k_to_mono_16k(media_dir):
    wave = decode.load_audio(media_dir / "movie-hello.mp4")
    stereo = _stereo_48k(media_dir / "movie-hello.mp4")  # fltp [2, 399360] at 48 kHz
    assert stereo.shape == (2, 399360)
    assert wave.dtype == np.float32 and wave.shape == (399360 // 3,)  # 8.32 s at 16 kHz
    assert np.abs(wave).max() <= 1.0
    reference = signal.resample_poly(stereo.mean(0).astype(np.float64), 1, 3)
    inner = slice(1000, -1000)
    err = wave[inner] - reference[inner]  # two different resampling filters
    assert np.sqrt(np.mean(err**2)) < 0.05 * np.sqrt(np.mean(reference[inner] ** 2))
    assert np.abs(err).max() < 0.05
    with pytest.raises(ValueError, match="mix"):
        decode.load_audio(media_dir / "movie-hello.mp4", mix="left")


def test_audio_first_channel(tmp_path):
    """`mix="first"` keeps channel 0 (TDC's `audio[:, 0]`), "mean" averages; a 16 kHz stereo WAV
    whose channels differ."""
    from scipy.io import wavfile

    t = np.arange(16000) / 16000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 97 * t)
    wavfile.write(tmp_path / "stereo.wav", 16000, np.stack([left, right], 1).astype(np.float32))
    first = decode.load_audio(tmp_path / "stereo.wav", mix="first")
    mean = decode.load_audio(tmp_path / "stereo.wav")
    np.testing.assert_allclose(first, left, atol=1e-6)
    np.testing.assert_allclose(mean, (left + right) / 2, atol=1e-6)


def test_audio_native_rate_and_silent_track(media_dir):
    cockatoo = decode.load_audio(media_dir / "cockatoo.mp4")  # mono mp3 at 16 kHz, silent
    assert cockatoo.shape == (222383,) and not cockatoo.any()
    short = decode.load_audio(media_dir / "realshort.mp4", sample_rate=8000)
    assert short.shape == (-(-56320 // 6),) and np.abs(short).max() > 0.01  # ceil(n * 8k / 48k)


def remux_without_audio(src, dst):
    """Copies the video stream of `src` into `dst` (no re-encoding, no audio)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream_from_template(vin)
        for packet in inp.demux(vin):
            if packet.dts is None:
                continue
            packet.stream = vout
            out.mux(packet)
    return dst


def test_video_without_audio_track(tmp_path, media_dir):
    path = remux_without_audio(media_dir / "realshort.mp4", tmp_path / "silent.mp4")
    assert decode.load_audio(path) is None
    clip = decode.load_video(path, size=32)
    assert clip.frames.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("mode,ext", [("RGB", ".jpg"), ("RGBA", ".png"), ("P", ".png"),
                                      ("L", ".webp")])
def test_still_image_is_a_one_frame_clip(tmp_path, mode, ext):
    """LLaVA-style image records (TDC stage 1): a still image decodes as one frame at t = 0,
    any Pillow mode converted to RGB, resized (long side) and padded like video frames."""
    import PIL.Image

    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
    path = tmp_path / f"pic{ext}"
    img.save(path)
    assert decode.is_image(path) and not decode.is_image(tmp_path / "clip.mp4")
    native = decode.load_video(path, size=None, pad_to_square=False)
    assert native.frames.shape == (1, 30, 50, 3) and native.frames.dtype == np.uint8
    np.testing.assert_array_equal(native.frames[0],
                                  np.asarray(PIL.Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(native.timestamps, [0.0])
    clip = decode.load_video(path, size=20, fill=(1, 2, 3))  # 50x30 -> 20x12, rows 4..15
    assert clip.frames.shape == (1, 20, 20, 3)
    assert (clip.frames[0, :4] == [1, 2, 3]).all() and (clip.frames[0, 16:] == [1, 2, 3]).all()
    assert clip.frames[0, 4:16].std() > 10


def test_broken_image_raises_naming_the_file(tmp_path):
    import PIL.Image

    good = tmp_path / "good.png"
    PIL.Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(good)
    for name, data in (("truncated.png", good.read_bytes()[:60]), ("text.jpg", b"not a jpeg")):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(decode.VideoDecodeError, match=f"{name}: cannot decode the image"):
            decode.load_video(bad)
