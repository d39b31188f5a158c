"""Progress reports and cancellation of a registration (dirio.optim.progress, register's
``progress_callback``): one report per optimisation step with exact counts, the same field with and
without an observer, a clean stop when the observer raises, and observers kept per thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dirio.api import register
from dirio.optim.progress import Cancelled, Progress, observing, report
from dirio.testing.synthetic import warped_pair

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in (16, 14, 12)), indexing="ij")
    image = np.exp(-(i ** 2 + 2 * j ** 2 + 3 * k ** 2) * 2.0).astype(np.float32)
    return warped_pair(image, sigma=3.0, max_displacement=1.5, seed=1)


def test_one_report_per_step_with_levels_and_counts(pair):
    """Levels (2, 1) x iterations (3, 2): five reports, level by level, done counting to the total,
    and the field equals a run without an observer bit for bit."""
    reports: list[Progress] = []
    result = register(pair.fixed, pair.moving, levels=(2, 1), iterations=(3, 2), progress=False, device="cpu",
                      progress_callback=reports.append)
    assert [(p.level, p.iteration, p.iterations, p.done, p.total) for p in reports] == [
        (0, 1, 3, 1, 5), (0, 2, 3, 2, 5), (0, 3, 3, 3, 5), (1, 1, 2, 4, 5), (1, 2, 2, 5, 5)]
    assert all(p.levels == 2 and p.description == "registering" for p in reports)
    plain = register(pair.fixed, pair.moving, levels=(2, 1), iterations=(3, 2), progress=False, device="cpu")
    assert np.array_equal(result.disp, plain.disp)


def test_an_exception_from_the_observer_stops_between_steps(pair):
    """Raising Cancelled at the fourth report ends the run there: the exception propagates and no
    further step runs."""
    seen: list[int] = []

    def stop_at_four(progress: Progress) -> None:
        seen.append(progress.done)
        if progress.done == 4:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        register(pair.fixed, pair.moving, levels=(2, 1), iterations=(3, 3), progress=False, device="cpu",
                 progress_callback=stop_at_four)
    assert seen == [1, 2, 3, 4]


def test_observers_belong_to_their_thread_and_block():
    """An observer set in one thread does not see another thread's reports, and is gone after its block."""
    mine: list[Progress] = []
    theirs: list[Progress] = []
    progress = Progress("x", 0, 1, 1, 1, 1, 1)
    with observing(mine.append):
        worker = threading.Thread(target=lambda: [report(progress) for _ in range(3)])
        worker.start()
        worker.join()
        report(progress)
        with observing(theirs.append):
            report(progress)
        report(progress)
    report(progress)
    assert len(mine) == 2 and len(theirs) == 1
