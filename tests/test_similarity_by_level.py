"""Similarity options with one value per pyramid level (:mod:`dirio.losses.by_level`): parsing, the
level each value reaches, the checks, and how a preset's lists follow an override of its levels."""

from __future__ import annotations

import numpy as np
import pytest

from cli_helpers import assert_one_error_line, run_cli, write_smooth_pair
from dirio.api import register
from dirio.config.schema import key_values
from dirio.config.settings import make_settings
from dirio.losses import lncc as lncc_module
from dirio.losses.by_level import SimilarityByLevel, align_to_levels, at_level, make_level_similarity


def test_text_gives_one_value_per_level_and_paths_stay_text():
    assert key_values("window=5/5/9,kernel=box") == {"window": (5, 5, 9), "kernel": "box"}
    assert key_values("model=runs/best.pt") == {"model": "runs/best.pt"}
    assert key_values("window=7") == {"window": 7}


def test_a_list_option_builds_one_similarity_per_level():
    similarity = make_level_similarity("lncc", {"window": (3, 5, 9), "kernel": "box"})
    assert isinstance(similarity, SimilarityByLevel) and similarity.name == "lncc"
    assert [similarity.at(level).window for level in range(3)] == [3, 5, 9]
    assert similarity.at(7).window == 9 and similarity.finest.window == 9 and similarity.coarsest.window == 3
    assert all(s.kernel == "box" for s in similarity.similarities)
    plain = make_level_similarity("lncc", {"window": 7})
    assert not isinstance(plain, SimilarityByLevel) and at_level(plain, 2) is plain


def test_lists_of_different_lengths_or_levels_are_refused():
    with pytest.raises(ValueError, match="same, non-zero number of values"):
        make_level_similarity("mind", {"radius": (1, 2), "dilation": (1, 2, 3)})
    with pytest.raises(ValueError, match="give 2 values .* but there are 3 levels"):
        make_settings(None, levels=(4, 2, 1), iterations=(1, 1, 1), similarity_options={"window": (5, 9)}).validate()
    with pytest.raises(ValueError, match="LNCC window must be an odd positive number"):
        make_level_similarity("lncc", {"window": (5, 4)})


def test_a_preset_list_follows_its_levels_by_shrink_factor():
    options = {"window": (5, 5, 9), "kernel": "box"}
    assert align_to_levels(options, (4, 2, 1), (2, 1)) == {"window": (5, 9), "kernel": "box"}
    assert align_to_levels(options, (4, 2, 1), (4, 2)) == {"window": (5, 5), "kernel": "box"}
    assert align_to_levels(options, (4, 2, 1), (8, 4, 2, 1)) == {"window": (5, 5, 5, 9), "kernel": "box"}
    assert align_to_levels({"window": (3, 9)}, (2, 1), (1.5, 1.2)) == {"window": (3, 9)}  # nearest on log2
    assert align_to_levels({"window": (3, 9)}, (2, 1), (2 ** 0.5,)) == {"window": (9,)}  # a tie takes the finer
    assert align_to_levels({"window": 5}, (4, 2, 1), (2, 1)) == {"window": 5}
    preset = make_settings("brain-mri")
    windows = preset.terms.similarity_options["window"]
    assert len(windows) == len(preset.pyramid.levels) == 3
    two = make_settings("brain-mri", levels=(2, 1), iterations=(3, 2))
    two.validate()
    assert two.terms.similarity_options["window"] == tuple(windows[1:])
    coarse = make_settings("brain-mri", levels=(4, 2), iterations=(3, 2))
    assert coarse.terms.similarity_options["window"] == tuple(windows[:2])
    explicit = make_settings("brain-mri", levels=(2, 1), iterations=(3, 2), similarity_options={"window": 7})
    assert explicit.terms.similarity_options == {"window": 7}


def test_the_engine_uses_each_level_s_own_window(monkeypatch):
    """Every LNCC evaluation at the coarse level uses window 3, at the full level window 7."""
    seen = set()
    original = lncc_module.LNCC.__call__

    def spy(self, fixed, warped, mask=None):
        seen.add((tuple(fixed.shape[2:]), self.window))
        return original(self, fixed, warped, mask)

    monkeypatch.setattr(lncc_module.LNCC, "__call__", spy)
    rng = np.random.default_rng(0)
    fixed = rng.random((16, 20, 24)).astype(np.float32)
    moving = np.roll(fixed, 1, axis=0)
    register(fixed, moving, levels=(2, 1), iterations=(2, 2), similarity="lncc",
             similarity_options={"window": (3, 7)}, device="cpu", progress=False)
    assert seen == {((8, 10, 12), 3), ((16, 20, 24), 7)}


def test_per_level_windows_equal_the_plain_option_when_all_values_are_equal():
    rng = np.random.default_rng(1)
    fixed = rng.random((16, 20, 24)).astype(np.float32)
    moving = np.roll(fixed, 1, axis=1)
    common = dict(levels=(2, 1), iterations=(3, 3), device="cpu", progress=False)
    listed = register(fixed, moving, preset="brain-mri", similarity_options={"window": (5, 5)}, **common)
    plain = register(fixed, moving, preset="brain-mri", similarity_options={"window": 5}, **common)
    np.testing.assert_array_equal(listed.disp, plain.disp)


def test_a_wrong_number_of_values_is_one_error_line(tmp_path):
    pair = write_smooth_pair(tmp_path / "in", (12, 14, 16), np.eye(4))
    result = run_cli(["register", pair.fixed, pair.moving, "-o", tmp_path / "out", "--levels", "2,1",
                      "--iterations", "2,2", "--similarity-options", "window=5/5/9"])
    assert_one_error_line(result, "window", "3 values", "2 levels")
    assert not (tmp_path / "out").exists()
