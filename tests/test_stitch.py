import numpy as np

from geobatch.models.base import Instance, TileResult
from geobatch.stitch import LABEL_NODATA, Mosaic, compose


def instance(mask, score=0.7, score_map=None) -> Instance:
    return Instance(np.asarray(mask, bool), score, "p", score_map)


def test_earlier_prompt_wins_overlaps_and_nodata_wins_over_everything():
    mosaic = Mosaic("s", "unused", (2, 3), 256, ("water", "vegetation"))
    result = TileResult(
        "t",
        {
            "water": [instance([[1, 1, 0], [0, 0, 0]], score=0.9)],
            "vegetation": [instance([[0, 1, 1], [0, 0, 1]], score_map=np.full((2, 3), 0.6, np.float32))],
        },
    )
    valid = np.array([[1, 1, 1], [1, 1, 0]], bool)
    label, score = compose(mosaic, result, valid)
    assert label.tolist() == [[1, 1, 2], [0, 0, LABEL_NODATA]]
    assert np.allclose(score[0], [0.9, 0.9, 0.6]) and score[1, 0] == 0 and np.isnan(score[1, 2])


def test_a_tile_with_no_instances_is_background_where_valid():
    mosaic = Mosaic("s", "unused", (2, 2), 256, ("water",))
    label, score = compose(mosaic, TileResult("t", {"water": []}), np.array([[1, 0], [1, 1]], bool))
    assert label.tolist() == [[0, LABEL_NODATA], [0, 0]]
    assert np.isnan(score[0, 1]) and (score[[0, 1, 1], [0, 0, 1]] == 0).all()
