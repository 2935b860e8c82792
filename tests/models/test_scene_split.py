"""TDC scene split and chunk layout against `../shared/fixtures/tdc_scene_split`."""

import functools

import jax
import numpy as np
import pytest

from longvid_jax.models import scene_split

FIELDS = ("selected_frame_indices", "segment_boundaries", "split_points", "segment_sizes",
          "frame_segment_id", "frame_chunk_id", "frame_is_static")


@pytest.mark.parametrize("case", ["a40", "b5", "c250"])
def test_layout_matches_original(fixtures_dir, case):
    io = np.load(fixtures_dir / "tdc_scene_split" / "io.npz")
    layout = scene_split.scene_layout(io[f"{case}_features"],
                                      max_num_segments=int(io[f"{case}_max_num_segments"]))
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(layout, name), io[f"{case}_{name}"], err_msg=name)
    assert len(layout.selected_frame_indices) == int(io[f"{case}_new_split_size"])
    if f"{case}_cos_similarities" in io:
        np.testing.assert_allclose(layout.cos_similarities, io[f"{case}_cos_similarities"],
                                   atol=1e-6)
    else:
        assert layout.cos_similarities is None


def test_boundaries_are_the_lowest_similarities():
    rng = np.random.default_rng(0)
    scenes = rng.normal(size=(4, 3, 5))
    labels = np.repeat([0, 1, 2, 3], [7, 11, 5, 9])
    feats = scenes[labels] + 0.05 * rng.normal(size=(len(labels), 3, 5))
    layout = scene_split.scene_layout(feats, max_num_segments=3)
    np.testing.assert_array_equal(layout.segment_boundaries, [6, 17, 22])  # the scene cuts
    np.testing.assert_array_equal(layout.segment_sizes, [7, 11, 5, 9])
    # Chunks of 8 restart at every segment; each chunk's first frame is static.
    assert layout.frame_is_static.sum() == 1 + 2 + 1 + 2
    assert layout.frame_chunk_id.max() == 5


def test_max_num_frames_rule_and_errors():
    assert scene_split.max_num_frames(100, with_audio=False) == 224  # (8192-116)//32 = 252
    assert scene_split.max_num_frames(1000, with_audio=True) == (8192 - 1016) // 38
    assert scene_split.max_num_frames(9000, with_audio=False) == 1
    with pytest.raises(ValueError, match="text_len"):
        scene_split.max_num_frames(-1, with_audio=False)
    with pytest.raises(ValueError, match="N, P, D"):
        scene_split.scene_layout(np.zeros((0, 2, 2)))


def _host_starts(features, n, max_num_segments):
    layout = scene_split.scene_layout(features[:n], max_num_segments=max_num_segments)
    starts = np.zeros(features.shape[0], bool)
    points = layout.split_points[:-1]
    starts[points[points < n]] = True
    return starts


def test_in_graph_segment_starts_equal_host_layout():
    """`segment_starts` (jitted, a batch with different valid lengths) == `scene_layout`'s
    split points: long videos, one of exactly max + 2 frames, a short one (every frame a
    segment), one frame, and exact ties (frames drawn from 3 orthogonal vectors: similarities
    0 or 1, the earlier transition wins as in the stable argsort)."""
    rng = np.random.default_rng(3)
    f = 40
    random = rng.standard_normal((5, f, 4, 6)).astype(np.float32)
    basis = np.eye(3, 24, dtype=np.float32).reshape(3, 4, 6)
    tied = basis[rng.integers(0, 3, (2, f))] * rng.uniform(0.5, 2.0, (2, f, 1, 1))
    features = np.concatenate([random, tied.astype(np.float32)])
    lengths = np.array([40, 33, 26, 5, 1, 40, 29])
    mask = np.arange(f)[None] < lengths[:, None]
    got = np.asarray(jax.jit(functools.partial(scene_split.segment_starts, max_num_segments=24))(
        features, mask))
    for r, n in enumerate(lengths):
        np.testing.assert_array_equal(got[r], _host_starts(features[r], n, 24), err_msg=str(r))
    assert got[2].sum() == 25 and got[3].sum() == 5 and not got[~mask].any()
    with pytest.raises(ValueError, match="frame_mask"):
        scene_split.segment_starts(features, mask[:, :10])
