"""Early stopping on a plateau of the similarity: hand-computed stopping points and the engine hook."""

import pytest
import torch

from engine_helpers import EngineConfig, Objective, optimise
from dirio.optim.stopping import PlateauStop, make_stopping_rule


pytestmark = pytest.mark.usefixtures("one_thread")


def first_stop(rule, values):
    """Number of values fed when the rule first says stop (None if it never does)."""
    rule.start_level()
    for count, value in enumerate(values, 1):
        if rule.update(value):
            return count
    return None


def test_plateau_stops_at_the_hand_computed_iteration():
    # 30 - t for t < 30, then 0. window 5, tolerance 0.01: at 38 values the previous window
    # (t = 28..32: 2, 1, 0, 0, 0) has mean 0.6 > 0.01 * 30; at 39 it is (1, 0, 0, 0, 0), mean
    # 0.2 <= 0.3, so the rule stops after the 39th value.
    values = [30.0 - t for t in range(30)] + [0.0] * 30
    assert first_stop(PlateauStop(window=5, tolerance=0.01, min_iterations=10), values) == 39


def test_a_steady_decrease_never_stops():
    values = [-0.001 * t for t in range(300)]
    assert first_stop(PlateauStop(window=10, tolerance=0.01), values) is None


def test_no_progress_stops_as_soon_as_allowed():
    assert first_stop(PlateauStop(window=5, tolerance=0.01, min_iterations=12), [1.0] * 50) == 12
    assert first_stop(PlateauStop(window=8, tolerance=0.01, min_iterations=3), [1.0] * 50) == 16  # two windows


def test_the_test_is_invariant_to_the_similarity_offset_and_scale():
    values = [30.0 - t for t in range(30)] + [0.0] * 30
    shifted = [-3.0 + 0.01 * v for v in values]
    rule = PlateauStop(window=5, tolerance=0.01, min_iterations=10)
    assert first_stop(rule, shifted) == first_stop(rule, values) == 39


def test_start_level_forgets_the_previous_level():
    rule = PlateauStop(window=2, tolerance=0.0, min_iterations=0)
    for value in (1.0, 1.0, 1.0):
        rule.update(value)
    rule.start_level()
    assert rule.update(1.0) is False  # one value of the new level only


def test_factory_and_option_errors():
    assert make_stopping_rule("none") is None
    assert isinstance(make_stopping_rule("plateau", window=4), PlateauStop)
    with pytest.raises(ValueError, match="none, plateau"):
        make_stopping_rule("patience")
    with pytest.raises(ValueError, match="valid options: window, tolerance, min_iterations"):
        make_stopping_rule("plateau", patience=3)
    with pytest.raises(ValueError, match="window"):
        PlateauStop(window=0)
    with pytest.raises(ValueError, match="early stopping"):
        EngineConfig(early_stop="patience").validate()


class MeanSquares:
    def features(self, image):
        return image

    def __call__(self, fixed, warped, mask=None):
        return ((fixed - warped) ** 2).mean()


def test_engine_stops_a_level_early_and_records_the_iterations_run():
    grid = torch.stack(torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij"))
    moving = torch.exp(-((grid - 10.0) ** 2).sum(0) / 20.0)[None, None]
    fixed = torch.exp(-(((grid[0] - 9.0) ** 2) + (grid[1] - 10.0) ** 2) / 20.0)[None, None]
    objectives = [Objective("mse", "similarity", MeanSquares(), 1.0)]
    common = dict(levels=(2, 1), iterations=(200, 200), lr=0.2, schedule="constant", progress=False)
    fixed_run = optimise(fixed, moving, objectives, EngineConfig(**common))
    stopped = optimise(fixed, moving, objectives, EngineConfig(
        **common, early_stop="plateau", early_stop_options={"window": 5, "tolerance": 0.02, "min_iterations": 10}))
    assert [lv["iterations_run"] for lv in fixed_run.levels] == [200, 200]
    runs = [lv["iterations_run"] for lv in stopped.levels]
    assert all(10 <= n < 200 for n in runs)
    assert len(stopped.history) == sum(runs)
    # the stopped run still registers the 1-voxel shift (u_0 ~ +1 at the blob centre)
    assert 0.6 < float(stopped.displacement[0, 0, 9, 10]) < 1.4
