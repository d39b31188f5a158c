"""``--network-budget``: ``paper`` keeps the papers' schedules, ``cpu`` swaps in the CPU defaults of the
network options left unset (NIO on LapIRN's coarsest level only, loss at half resolution; IO one step;
NIO's ``shifted`` schedule for a pair whose coarsest network field fits worse than no deformation),
explicit options still win, and the setting reaches the settings from the command line and config files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dirio.api import register
from dirio.config.schema import FILE_KEYS, settings_from_values
from dirio.config.settings import make_settings
from dirio.errors import DirioError
from dirio.io.checkpoints import save_checkpoint
from dirio.methods import network as network_module
from dirio.methods.network import MODE_DEFAULTS, NETWORK_BUDGETS, clear_model_cache
from dirio.methods.network_fit import CoarseFit
from dirio.transforms.networks import LapIRN

pytestmark = pytest.mark.usefixtures("one_thread")


def stage(**values):
    settings = make_settings(**values)
    return settings.stage_options(settings.method)


def test_the_paper_budget_is_the_default_and_keeps_the_papers_schedules():
    nio = stage(method="nio")
    assert nio.config.network_budget == "paper" and NETWORK_BUDGETS["paper"] is MODE_DEFAULTS
    assert nio.config.pyramid("nio").iterations == (100, 60, 30)
    assert nio.config.pyramid("nio").levels == (1.0, 1.0, 1.0)
    assert nio.config.option("nio", "levels") is None  # every LapIRN level is optimised
    assert nio.optimizer_config().lr == pytest.approx(1e-4) and nio.optimizer_config().optimizer == "adam"
    io = stage(method="network-io")
    assert io.config.pyramid("network-io").iterations == (50,)
    assert io.optimizer_config().lr == pytest.approx(2e-5) and io.optimizer_config().optimizer == "amsgrad"


def test_the_cpu_budget_optimises_the_coarsest_level_on_a_half_resolution_loss_grid():
    nio = stage(method="nio", network_budget="cpu")
    assert nio.config.pyramid("nio").iterations == (25, 0, 0)
    assert nio.config.pyramid("nio").levels == (2.0, 2.0, 1.0)
    assert nio.config.option("nio", "levels") == (1,)
    assert nio.optimizer_config().lr == pytest.approx(1e-4)  # the paper's optimiser and loss are kept
    assert [t.weight for t in nio.config.terms()] == [pytest.approx(0.6), pytest.approx(0.4)]
    assert nio.config.refine("nio").iterations == 10  # then 10 steps refine the field
    io = stage(method="network-io", network_budget="cpu")
    assert io.config.pyramid("network-io").iterations == (1,)
    assert io.config.refine("network-io").iterations == 10
    assert stage(method="nio").config.refine("nio").iterations == 0  # the papers' schedules: no refinement
    assert stage(method="network", network_budget="cpu").config.refine("network").iterations == 0


def test_options_given_explicitly_override_the_budget():
    nio = stage(method="nio", network_budget="cpu", network_iterations=(10, 5, 0), network_levels=(1, 2),
                network_resolution=(4.0,), network_lr=3e-4)
    assert nio.config.pyramid("nio").iterations == (10, 5, 0)
    assert nio.config.pyramid("nio").levels == (4.0, 4.0, 4.0)
    assert nio.config.option("nio", "levels") == (1, 2)
    assert nio.optimizer_config().lr == pytest.approx(3e-4)


def test_the_budget_comes_from_the_command_line_and_config_files_and_bad_names_are_refused():
    assert "network_budget" in FILE_KEYS
    settings = settings_from_values({"method": "nio", "network_budget": "cpu"})
    assert settings.network.network_budget == "cpu"
    assert settings.stage_options("nio").config.pyramid("nio").iterations == (25, 0, 0)
    with pytest.raises(DirioError, match="network_budget"):
        settings_from_values({"method": "nio", "network_budget": "gpu"})
    with pytest.raises(ValueError, match="unknown `network_budget` 'fast'"):
        make_settings(method="nio", network_budget="fast").validate()


def test_the_shifted_schedule_fills_only_what_the_user_left_out():
    nio = stage(method="nio", network_budget="cpu").config
    assert nio.shifted_schedule("nio") == {"iterations": (10, 20, 0), "levels": (1, 2), "lr": 3e-4}
    shifted = nio.with_schedule(nio.shifted_schedule("nio"))
    assert shifted.pyramid("nio").iterations == (10, 20, 0) and shifted.option("nio", "levels") == (1, 2)
    assert shifted.option("nio", "lr") == pytest.approx(3e-4) and shifted.refine("nio").iterations == 10
    given_lr = stage(method="nio", network_budget="cpu", network_lr=5e-5).config
    assert given_lr.with_schedule(given_lr.shifted_schedule("nio")).option("nio", "lr") == pytest.approx(5e-5)
    # a schedule given on the command line is the user's: no check, no switch
    assert stage(method="nio", network_budget="cpu", network_iterations=(5, 0, 0)).config.shifted_schedule("nio") is None
    assert stage(method="nio", network_budget="cpu", network_levels=(1,)).config.shifted_schedule("nio") is None
    assert stage(method="nio").config.shifted_schedule("nio") is None  # the papers' schedule has none
    # IO is checked, with nothing to switch to (a warning only)
    assert stage(method="network-io", network_budget="cpu").config.shifted_schedule("network-io") == {}


def _blob_pair(size=16, shift=1.5):
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * 3, indexing="ij"))
    fixed = np.exp(-(((grid - size / 2) / (size / 4)) ** 2).sum(0)).astype(np.float32)
    moving = np.exp(-(((grid - size / 2 - shift) / (size / 4)) ** 2).sum(0)).astype(np.float32)
    return fixed, moving


@pytest.mark.parametrize("fits", [True, False])
def test_nio_with_the_cpu_budget_takes_the_shifted_schedule_only_when_the_coarsest_field_fits_worse(
        tmp_path, monkeypatch, caplog, fits):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, LapIRN(start_channel=2))
    clear_model_cache()
    checked = []

    def fake_fit(transform, similarity, fixed, moving, factor=2.0, **_):
        checked.append((transform.schedule, similarity.name, factor, tuple(fixed.shape)))
        return CoarseFit(identity=-0.5, network=-0.6 if fits else -0.4)

    monkeypatch.setattr(network_module, "coarse_fit", fake_fit)
    fixed, moving = _blob_pair()
    try:
        with caplog.at_level("WARNING", logger="dirio.methods.network"):
            result = register(fixed, moving, method="nio", network_budget="cpu", model=str(path), device="cpu",
                              progress=False)
    finally:
        clear_model_cache()
    assert checked == [((1, 2, 3), "lncc", 2.0, (1, 1, 16, 16, 16))]  # once, on the first level's loss grid
    nio_rows = [row for row in result.history if row["stage"] == "nio"]
    levels = [row["level"] for row in nio_rows]
    record = result.stages[0]
    assert record["coarse_fit"] == {"identity": -0.5, "network": pytest.approx(-0.6 if fits else -0.4), "fits": fits}
    if fits:
        assert levels == [0] * 25 and record["schedule"] == "budget"
        assert nio_rows[0]["lr"] == pytest.approx(1e-4) and not caplog.records
    else:
        assert levels == [0] * 10 + [1] * 20 and record["schedule"] == "shifted"
        assert nio_rows[0]["lr"] == pytest.approx(3e-4)
        assert "worse than no deformation" in caplog.text and "levels 1,2" in caplog.text
    assert [row["stage"] for row in result.history[len(nio_rows):]] == ["refine"] * 10


def test_io_with_the_cpu_budget_warns_on_a_pair_the_network_does_not_fit_and_keeps_its_schedule(
        tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, LapIRN(start_channel=2))
    clear_model_cache()
    monkeypatch.setattr(network_module, "coarse_fit", lambda *a, **k: CoarseFit(identity=-0.5, network=-0.4))
    fixed, moving = _blob_pair()
    try:
        with caplog.at_level("WARNING", logger="dirio.methods.network"):
            result = register(fixed, moving, method="network-io", network_budget="cpu", model=str(path),
                              device="cpu", progress=False)
    finally:
        clear_model_cache()
    assert [row["stage"] for row in result.history] == ["network-io"] + ["refine"] * 10  # 1 IO step, as budgeted
    assert result.stages[0]["coarse_fit"]["fits"] is False and result.stages[0]["schedule"] == "budget"
    assert "worse than no deformation" in caplog.text and "--method nio --network-budget cpu adapts" in caplog.text


def test_nio_with_the_cpu_budget_steps_only_the_coarsest_level_and_leaves_the_others_pretrained(tmp_path,
                                                                                               monkeypatch):
    monkeypatch.setattr(network_module, "coarse_fit", lambda *a, **k: CoarseFit(identity=0.0, network=-1.0))
    torch.manual_seed(0)
    model = LapIRN(start_channel=2)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model)
    clear_model_cache()
    stepped = []  # (parameter of level k, changed by the step) for every optimiser step
    from dirio.optim import step as step_module

    original = step_module.Step.__call__

    def recording(self, transform, ctx, optimizer, params, *args, **kwargs):
        if not hasattr(transform, "network"):  # the refinement's dense field
            return original(self, transform, ctx, optimizer, params, *args, **kwargs)
        before = {k: [p.detach().clone() for p in transform.network.level_parameters(k)] for k in (1, 2, 3)}
        out = original(self, transform, ctx, optimizer, params, *args, **kwargs)
        stepped.append({k: any(not torch.equal(a, b) for a, b in zip(before[k], transform.network.level_parameters(k)))
                        for k in (1, 2, 3)})
        return out

    monkeypatch.setattr(step_module.Step, "__call__", recording)
    grid = np.stack(np.meshgrid(*[np.arange(16, dtype=np.float32)] * 3, indexing="ij"))
    fixed = np.exp(-(((grid - 8.0) / 4.0) ** 2).sum(0)).astype(np.float32)
    moving = np.exp(-(((grid - 9.5) / 4.0) ** 2).sum(0)).astype(np.float32)
    try:
        result = register(fixed, moving, method="nio", network_budget="cpu", model=str(path), device="cpu",
                          progress=False)
    finally:
        clear_model_cache()
    nio_rows = [row for row in result.history if row["stage"] == "nio"]
    assert len(nio_rows) == 25 and {row["level"] for row in nio_rows} == {0}
    assert [row["stage"] for row in result.history[25:]] == ["refine"] * 10  # then the field is refined
    assert [s["stage"] for s in result.stages] == ["nio", "refine"]
    assert len(stepped) == 25
    assert all(changed[1] and not changed[2] and not changed[3] for changed in stepped)
