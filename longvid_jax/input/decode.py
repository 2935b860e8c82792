"""Decoding real video files: frames at a fixed rate (decord) and mono 16 kHz audio (PyAV).

A still image (`IMAGE_EXTENSIONS`: the single images of LLaVA-style image-text data, TDC's
stage 1) is decoded with Pillow as a one-frame clip, so every reader of `load_video` takes it.

Frames follow TDC's sampling (1 fps, then a uniform cap; tdc/train.py, `uniform_sample`) and
`expand2square` (pad to a centred square with the processor mean as fill). Readers are opened per
call and closed before returning: decord objects do not pickle, so Grain workers open files
inside their map function.

Audio is decoded with PyAV, not decord's AudioReader: decord 0.6.0 returns NaNs when it resamples
the 44.1 kHz clip in shared/media and scrambles planar stereo at the native rate.

Letters: F frames, H/W pixels, C colour channels.
"""

import dataclasses
import math
import os

import av
import decord
import numpy as np
import PIL.Image
import soxr


class VideoDecodeError(ValueError):
    """A video or its audio cannot be decoded; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.path, self.problem)


@dataclasses.dataclass(frozen=True)
class VideoClip:
    """Frames sampled from a video.

    Attributes:
        frames: uint8[F, H, W, 3] RGB.
        timestamps: float32[F], each frame's presentation time in seconds from the first frame.
        duration: the video's duration in seconds (decoded frames / average fps).
        native_fps: the stream's average frame rate (frames / s).
    """

    frames: np.ndarray
    timestamps: np.ndarray
    duration: float
    native_fps: float


def _short(err: BaseException) -> str:
    """First line of a (decord) error message, without its C++ source location, <= 200 chars."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Error:" in text:
        text = text.split("Error:", 1)[1].strip()
    return f"{type(err).__name__}: {text[:200]}"


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")


def _probe(path: str) -> tuple[float | None, int, int]:
    """(frames the header promises or None, width, height) of the first video stream, via PyAV.

    The promise is nb_frames, else duration x average rate.

    Raises:
        VideoDecodeError: not a media file, or no video stream.
    """
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            expected = None
            if stream.frames:
                expected = float(stream.frames)
            elif stream.duration and stream.time_base and stream.average_rate:
                expected = float(stream.duration * stream.time_base * stream.average_rate)
            return expected, width, height
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"not a readable media file ({_short(e)})") from e


SUBSAMPLE_RULES = ("linspace", "floor")


def sample_indices(frame_times: np.ndarray, duration: float, fps: float, max_frames: int,
                   subsample: str = "linspace"):
    """Frame indices at times i / fps (< duration), capped uniformly to `max_frames`.

    Args:
        frame_times: float[N] presentation time of every decoded frame (non-decreasing), s.
        duration: s.
        fps: sampling rate (frames / s).
        max_frames: cap; above it the n candidate times are subsampled uniformly:
            "linspace" keeps `round(linspace(0, n - 1, max_frames))` (LongVA / TPO, the
            lmms-eval loaders), "floor" keeps `int(i * n / max_frames)` (TDC's
            `uniform_sample` in training).
        subsample: "linspace" or "floor".

    Returns:
        int64[F] indices of the decoded frames nearest to the chosen times.

    Raises:
        ValueError: an unknown `subsample` rule.
    """
    if subsample not in SUBSAMPLE_RULES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_RULES}, got {subsample!r}")
    num_candidates = max(1, int(math.ceil(duration * fps - 1e-9)))
    times = np.arange(num_candidates, dtype=np.float64) / fps
    times = times[times < duration] if duration > 0 else times[:1]
    n = times.shape[0]
    if n > max_frames and subsample == "linspace":
        times = times[np.linspace(0, n - 1, max_frames).round().astype(np.int64)]
    elif n > max_frames:
        times = times[(np.arange(max_frames) * (n / max_frames)).astype(np.int64)]
    right = np.clip(np.searchsorted(frame_times, times), 1, len(frame_times) - 1)
    left = right - 1
    if len(frame_times) == 1:
        return np.zeros(times.shape, np.int64)
    use_right = np.abs(frame_times[right] - times) < np.abs(times - frame_times[left])
    return np.where(use_right, right, left).astype(np.int64)


def expand2square(frames: np.ndarray, fill) -> np.ndarray:
    """Pads uint8[F, H, W, 3] to a centred [F, L, L, 3] square, L = max(H, W), with `fill`.

    As LLaVA/TDC `expand2square`: the offset is (L - short side) // 2.
    """
    f, h, w, c = frames.shape
    side = max(h, w)
    if h == w:
        return frames
    out = np.empty((f, side, side, c), frames.dtype)
    out[...] = np.asarray(fill, frames.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top : top + h, left : left + w] = frames
    return out


def tower_pixels(frames: np.ndarray, side: int, mean, std) -> np.ndarray:
    """A vision tower's input from decoded frames, as LLaVA / Cambrian / TDC prepare images.

    uint8[F, H, W, 3] -> `expand2square` (fill = the tower's mean x 255) -> bicubic resize to
    side x side (`jax.image.resize`, on the host) -> clip to [0, 1] -> (x - mean) / std.

    Returns:
      float32[F, side, side, 3].
    """
    square = expand2square(frames, tuple(int(m * 255) for m in mean))
    x = square.astype(np.float32) / 255.0
    if x.shape[1] != side:
        import jax  # only here: the rest of this module runs without it

        x = np.asarray(jax.image.resize(x, (x.shape[0], side, side, 3), "bicubic"))
    return (np.clip(x, 0.0, 1.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


_COPY_BUG = "DECORDArrayCopyFromTo"


def _decode_then_resize(path: str, idx: np.ndarray, width: int, height: int,
                        num_threads: int) -> np.ndarray:
    """Decodes at native size (8 frames at a time) and resizes with PyAV's swscale (bilinear).

    The fallback for decord 0.6.0's resize bug: asking for a width that divides 48 makes
    `get_batch` fail with a buffer-size mismatch in DECORDArrayCopyFromTo.
    """
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
        out = np.empty((idx.shape[0], height, width, 3), np.uint8)
        for start in range(0, idx.shape[0], 8):
            chunk = reader.get_batch(idx[start : start + 8].tolist()).asnumpy()
            for j, frame in enumerate(chunk):
                small = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
                    width=width, height=height, interpolation="BILINEAR"
                )
                out[start + j] = small.to_ndarray()
        del reader
    except (decord.DECORDError, RuntimeError) as e:
        raise VideoDecodeError(path, f"corrupt: decoding frames failed ({_short(e)})") from e
    return out


# File name endings decoded as a still image (one frame) rather than a video.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def is_image(path) -> bool:
    """Whether `load_video` reads `path` as a still image (by its name's ending)."""
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def _load_image(path: str, size: int | None, pad_to_square: bool, fill) -> "VideoClip":
    """A still image as a one-frame `VideoClip` (time 0, duration 0); see `load_video`."""
    try:
        with PIL.Image.open(path) as img:
            img = img.convert("RGB")  # palette / grey / alpha / CMYK -> RGB, decodes it fully
            if size is not None:
                w, h = img.size
                scale = size / max(w, h)
                img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                 PIL.Image.Resampling.BICUBIC)
            frame = np.asarray(img, np.uint8)
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise VideoDecodeError(path, f"cannot decode the image ({_short(e)})") from e
    frames = frame[None]
    if pad_to_square:
        frames = expand2square(frames, fill)
    return VideoClip(frames=np.ascontiguousarray(frames), timestamps=np.zeros(1, np.float32),
                     duration=0.0, native_fps=0.0)


def load_video(
    path,
    *,
    fps: float = 1.0,
    max_frames: int = 64,
    size: int | None = None,
    pad_to_square: bool = True,
    fill=(0, 0, 0),
    num_threads: int = 1,
    subsample: str = "linspace",
) -> VideoClip:
    """Decodes frames at `fps`, at most `max_frames`, optionally resized and padded to a square.

    A file whose decodable frame count falls short of its header's (nb_frames, else duration x
    rate) by more than 1 % + 2 frames counts as truncated: decord would otherwise silently return
    a shorter clip.

    Sampling: times t_i = i / fps for all t_i < duration (14.0 s -> 14 frames at 1 fps, 8.3 s
    -> 9); above `max_frames`, a uniform subsample keeps `max_frames` (`subsample`, see
    `sample_indices`); each time takes the decoded frame whose presentation time is nearest.

    Args:
        path: video file.
        fps: sampling rate in frames per second.
        max_frames: cap on the number of frames.
        size: if given, decode resized so the long side is `size` (aspect kept, decord's scaler).
        pad_to_square: pad to a centred square (`size` x `size` when resized) with `fill`.
        fill: RGB uint8 padding colour (TDC: the image processor's mean x 255).
        num_threads: decoder threads (0 = decord's automatic choice).
        subsample: "linspace" or "floor", the rule above `max_frames` (`sample_indices`).

    A still image (`is_image`) gives one frame at time 0 (duration 0, native_fps 0), resized
    with Pillow's bicubic filter when `size` is given.

    Returns:
        `VideoClip` with frames uint8[F, S, S, 3] (or [F, H, W, 3] unpadded).

    Raises:
        VideoDecodeError: missing, empty, non-video, truncated or corrupt file; zero frames;
            unreadable fps; an image that does not decode.
    """
    path = os.fspath(path)
    if subsample not in SUBSAMPLE_RULES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_RULES}, got {subsample!r}")
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"fps must be > 0 and max_frames >= 1, got {fps}, {max_frames}")
    _check_file(path)
    if is_image(path):
        return _load_image(path, size, pad_to_square, fill)
    expected, w, h = _probe(path)
    kwargs = {}
    if size is not None:
        if not w or not h:
            raise VideoDecodeError(path, f"unreadable frame size {w}x{h}")
        scale = size / max(w, h)
        kwargs = dict(width=max(1, round(w * scale)), height=max(1, round(h * scale)))
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads, **kwargs)
    except (decord.DECORDError, RuntimeError) as e:
        raise VideoDecodeError(path, f"cannot open the video stream ({_short(e)})") from e
    try:
        num = len(reader)
        if num == 0:
            raise VideoDecodeError(path, "no decodable frames")
        native_fps = float(reader.get_avg_fps())
        if not math.isfinite(native_fps) or native_fps <= 0:
            raise VideoDecodeError(path, f"unreadable frame rate ({native_fps})")
        if expected is not None and num < 0.99 * expected - 2:
            raise VideoDecodeError(
                path, f"truncated or corrupt: {num} frames decodable, header promises "
                f"{expected:.0f}"
            )
        duration = num / native_fps
        try:
            frame_times = reader.get_frame_timestamp(np.arange(num))[:, 0].astype(np.float64)
        except (decord.DECORDError, RuntimeError, IndexError):
            frame_times = None
        if (
            frame_times is None
            or not np.all(np.isfinite(frame_times))
            or np.any(np.diff(frame_times) < 0)
        ):
            frame_times = np.arange(num, dtype=np.float64) / native_fps
        idx = sample_indices(frame_times, duration, fps, max_frames, subsample)
        try:
            frames = reader.get_batch(idx.tolist()).asnumpy()
        except (decord.DECORDError, RuntimeError) as e:
            if not (kwargs and _COPY_BUG in str(e)):
                raise VideoDecodeError(
                    path, f"corrupt: decoding frames failed ({_short(e)})"
                ) from e
            frames = None
    finally:
        del reader
    if frames is None:  # decord's scaler fails for some widths (4, 6, 8, 12, 16, 24, 48, ...)
        frames = _decode_then_resize(path, idx, kwargs["width"], kwargs["height"], num_threads)
    if frames.ndim != 4 or frames.shape[0] != idx.shape[0] or frames.shape[-1] != 3:
        raise VideoDecodeError(
            path, f"corrupt: asked for {idx.shape[0]} frames, got array {frames.shape}"
        )
    if pad_to_square:
        frames = expand2square(frames, fill)
        if size is not None and frames.shape[1] != size:
            raise VideoDecodeError(path, f"decoded size {frames.shape[1:3]} != {size}")
    return VideoClip(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        timestamps=frame_times[idx].astype(np.float32),
        duration=float(duration),
        native_fps=native_fps,
    )


def load_audio(path, *, sample_rate: int = 16000, mix: str = "mean") -> np.ndarray | None:
    """Decodes a file's first audio stream to mono float32 at `sample_rate`.

    Channels are averaged (`mix="mean"`) or the first is kept (`mix="first"`, as TDC's
    `AudioProcessor.read_audio` takes `audio[:, 0]`); resampling uses soxr (high quality). A stream that decodes to
    more than max(0.25 s, 0.5 %) less than its header's duration counts as truncated. Sample 0
    is the stream's first decoded sample (a start offset between the audio and video streams,
    typically < 0.1 s, is ignored).

    Args:
        path: media file.
        sample_rate: output rate in Hz.
        mix: "mean" or "first", how channels become one.

    Returns:
        float32[samples] in [-1, 1], or None when the file has no audio track (a valid case:
        the pipeline then uses silence features with `audio_mask` False).

    Raises:
        VideoDecodeError: missing/empty/unreadable file, or a corrupt or truncated audio stream.
    """
    if mix not in ("mean", "first"):
        raise ValueError(f"mix must be 'mean' or 'first', got {mix!r}")
    path = os.fspath(path)
    _check_file(path)
    chunks, in_rate = [], None

    def mono(planar: np.ndarray) -> np.ndarray:  # [channels, n] -> [n]
        return planar.mean(axis=0) if mix == "mean" else planar[0]

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            expected_s = (
                float(stream.duration * stream.time_base)
                if stream.duration and stream.time_base
                else None
            )
            to_float = av.AudioResampler(format="fltp")  # planar float; same layout and rate
            for frame in container.decode(stream):
                in_rate = in_rate or frame.sample_rate
                for out in to_float.resample(frame):
                    chunks.append(mono(out.to_ndarray()))
            for out in to_float.resample(None):
                chunks.append(mono(out.to_ndarray()))
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"corrupt audio stream ({_short(e)})") from e
    if not chunks or not in_rate:
        raise VideoDecodeError(path, "audio stream has no decodable samples")
    mono = np.concatenate(chunks).astype(np.float32)
    tolerance_s = max(0.25, 0.005 * expected_s) if expected_s is not None else 0.0
    if expected_s is not None and mono.shape[0] < in_rate * (expected_s - tolerance_s):
        raise VideoDecodeError(
            path, f"truncated audio: {mono.shape[0] / in_rate:.2f} s decoded, header says "
            f"{expected_s:.2f} s"
        )
    if not np.all(np.isfinite(mono)):
        raise VideoDecodeError(path, "audio stream decodes to non-finite samples")
    if in_rate != sample_rate:
        mono = soxr.resample(mono, in_rate, sample_rate, quality="HQ").astype(np.float32)
    return np.clip(mono, -1.0, 1.0)
