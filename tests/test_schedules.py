"""Learning-rate schedules: values at the phase boundaries of each schedule."""

import math

import pytest

from dirio.optim.schedules import Cosine, Piecewise, make_schedule


def test_constant_schedule_is_one_everywhere():
    schedule = make_schedule("constant")
    assert [schedule(s, 10) for s in range(10)] == [1.0] * 10


def test_cosine_goes_from_one_to_final_through_the_midpoint():
    schedule = Cosine(final=0.2)
    assert schedule(0, 11) == pytest.approx(1.0)
    assert schedule(5, 11) == pytest.approx(0.2 + 0.8 * 0.5)
    assert schedule(10, 11) == pytest.approx(0.2)


def test_piecewise_matches_the_paper_phases_on_270_steps():
    # Paper (Fig. 1): constant for s <= 70, cosine until 180, linear until 270.
    schedule = Piecewise()
    total = 271  # steps 0..270, so step s is at fraction s / 270
    assert all(schedule(s, total) == 1.0 for s in range(0, 71))
    assert schedule(125, total) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-9)
    assert schedule(180, total) == pytest.approx(0.1)
    assert schedule(225, total) == pytest.approx(0.1 + (0.01 - 0.1) * 0.5)
    assert schedule(270, total) == pytest.approx(0.01)
    values = [schedule(s, total) for s in range(total)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:])), "the schedule must never increase"


def test_piecewise_boundaries_are_fractions_of_the_iteration_count():
    schedule = make_schedule("piecewise", constant_until=0.5, cosine_until=0.5, middle=0.3, final=0.0)
    assert schedule(50, 101) == 1.0
    assert schedule(75, 101) == pytest.approx(0.15)


def test_bad_schedule_names_and_options_are_rejected():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("exponential")
    with pytest.raises(ValueError, match="phase boundaries"):
        make_schedule("piecewise", constant_until=0.8, cosine_until=0.5)
    with pytest.raises(ValueError):
        make_schedule("constant", final=0.1)
