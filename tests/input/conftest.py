"""Shared fixtures of the input-pipeline tests: a private tokenizer cache, absl flags, clips."""

import os

import pytest
from absl import flags

from longvid_jax.input import decode
from longvid_jax.input import tokenizer as tokenizer_lib


@pytest.fixture(scope="package", autouse=True)
def tokenizer_cache(tmp_path_factory):
    """Builds tokenizer caches in a temporary folder (workers inherit the variable)."""
    path = tmp_path_factory.mktemp("longvid_jax_cache")
    old = os.environ.get("LONGVID_JAX_CACHE")
    os.environ["LONGVID_JAX_CACHE"] = str(path)
    tokenizer_lib.qwen2_tokenizer.cache_clear()
    yield path
    if old is None:
        os.environ.pop("LONGVID_JAX_CACHE", None)
    else:
        os.environ["LONGVID_JAX_CACHE"] = old


@pytest.fixture(scope="package")
def qwen2(tokenizer_cache):
    return tokenizer_lib.qwen2_tokenizer()


@pytest.fixture(scope="package")
def absl_flags():
    """Grain's worker processes read absl flags: parse them as absl.app.run would."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["pytest"])
    return flags.FLAGS


@pytest.fixture(scope="package")
def cockatoo_clip(media_dir):
    """cockatoo.mp4 (14.0 s, 1280x720, 20 fps) at 1 fps, 32 px (decoding it costs ~1 s)."""
    return decode.load_video(media_dir / "cockatoo.mp4", fps=1.0, max_frames=64, size=32,
                             fill=(10, 20, 30))
