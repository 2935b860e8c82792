"""TDC scene split and chunk layout against `../shared/fixtures/tdc_scene_split`."""

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
