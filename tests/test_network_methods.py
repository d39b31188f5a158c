"""Network methods (``--method network | network-io | nio | network+dense``): each runs end to end on a
tiny random-weight LapIRN, every one restores the pretrained weights bit for bit (after a result, a
non-finite loss and an interrupt), a ``dirio run`` over two pairs gives the second pair what
registering it alone gives, and the axis map sends images in and fields back consistently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dirio.api import register
from dirio.config.settings import make_settings
from dirio.errors import DirioError
from dirio.io.checkpoints import save_checkpoint
from dirio.losses.terms import InverseConsistencyTerm, Role, Term
from dirio.methods import network as network_methods
from dirio.methods.network import NetworkConfig, NetworkStage, clear_model_cache, load_model, register_network
from dirio.transforms.network import AxisMap, NetworkTransform
from dirio.transforms.networks import LapIRN

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 16, 16)


def blob(shape=SHAPE, centre_shift=0.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = np.array([n / 2 + centre_shift for n in shape], dtype=np.float32).reshape(3, 1, 1, 1)
    return np.exp(-(((grid - centre) / 4.0) ** 2).sum(0)).astype(np.float32)


@pytest.fixture()
def tiny_model(tmp_path):
    torch.manual_seed(0)
    model = LapIRN(start_channel=2)
    path = tmp_path / "tiny_lapirn.pt"
    save_checkpoint(path, model)
    clear_model_cache()
    yield path
    clear_model_cache()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FAST = {"network_iterations": None, "network_lr": 1e-3, "progress": False}
ITERATIONS = {"network-io": (3,), "nio": (2, 2, 1), "network": None, "network+dense": None}


@pytest.mark.parametrize("method", ["network", "network-io", "nio", "network+dense"])
def test_every_method_runs_end_to_end_and_restores_the_weights_bit_for_bit(tiny_model, method):
    model = load_model(NetworkConfig(model=str(tiny_model)), torch.device("cpu"))
    before = weights(model)
    flags = [p.requires_grad for p in model.parameters()]
    result = register(blob(), blob(centre_shift=2.0), method=method, model=str(tiny_model), device="cpu",
                      **{**FAST, "network_iterations": ITERATIONS[method]}, iterations=(3, 2))
    assert result.disp.shape == SHAPE + (3,) and np.isfinite(result.disp).all()
    assert same(before, weights(load_model(NetworkConfig(model=str(tiny_model)), torch.device("cpu"))))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert result.settings.method == method
    if method in ("network-io", "nio"):
        assert len(result.history) == sum(ITERATIONS[method])
        assert {row["stage"] for row in result.history} == {method}
    if method == "nio":
        assert sorted({row["level"] for row in result.history}) == [0, 1, 2]  # per-level progress
    if method == "network+dense":
        assert {row["stage"] for row in result.history} == {"dense"}
        assert [stage["stage"] for stage in result.stages] == ["network", "dense"]


def test_optimising_the_weights_changes_the_field_and_direct_inference_does_not(tiny_model):
    fixed, moving = blob(), blob(centre_shift=2.0)
    direct = register(fixed, moving, method="network", model=str(tiny_model), device="cpu", progress=False)
    again = register(fixed, moving, method="network", model=str(tiny_model), device="cpu", progress=False)
    tuned = register(fixed, moving, method="network-io", model=str(tiny_model), device="cpu", progress=False,
                     network_iterations=(3,), network_lr=1e-3)
    assert np.array_equal(direct.disp, again.disp)
    assert not np.allclose(direct.disp, tuned.disp)


class _Failing:
    """A term that returns NaN (or raises ``KeyboardInterrupt``) at its ``after``-th call."""

    def __init__(self, after: int, interrupt: bool):
        self.calls, self.after, self.interrupt = 0, after, interrupt

    def __call__(self, evaluation, name):
        self.calls += 1
        value = evaluation.field.abs().mean()
        if self.calls >= self.after:
            if self.interrupt:
                raise KeyboardInterrupt
            return value * float("nan")
        return value


@pytest.mark.parametrize("mode", ["network-io", "nio"])
@pytest.mark.parametrize("interrupt", [False, True], ids=["nan", "interrupt"])
def test_weights_are_restored_after_a_nan_loss_or_an_interrupt(tiny_model, monkeypatch, mode, interrupt):
    model = load_model(NetworkConfig(model=str(tiny_model)), torch.device("cpu"))
    before = weights(model)
    failing = _Failing(after=3, interrupt=interrupt)
    terms = [Term("lncc", Role.SIMILARITY, failing, 1.0)]
    monkeypatch.setattr(NetworkConfig, "terms", lambda self: terms)
    options = NetworkStage(mode=mode, config=NetworkConfig(model=str(tiny_model), network_lr=1e-2,
                                                             network_iterations=(5,) if mode == "network-io" else (2, 2, 2)))
    fixed, moving = (torch.from_numpy(a)[None, None] for a in (blob(), blob(centre_shift=2.0)))
    with pytest.raises(KeyboardInterrupt if interrupt else DirioError):
        register_network(fixed, moving, options, progress=False)
    assert failing.calls >= 3
    assert same(before, weights(model))
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    model = LapIRN(start_channel=2)
    fixed, moving = (torch.from_numpy(a)[None, None] for a in (blob(), blob(centre_shift=2.0)))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(fixed, moving).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_a_two_pair_run_gives_the_second_pair_the_result_of_registering_it_alone(tiny_model, tmp_path):
    from dirio.apps.runner import _load_pair, run_dataset
    from dirio.apps.workflow import register_inputs
    from dirio.config.files import run_configuration
    from dirio.io.dataset import load_dataset, write_synthetic_dataset
    from dirio.io.fields import load_field

    image = blob((16, 16, 16))
    labels = (image > 0.3).astype(np.int16) + (image > 0.7)
    dataset = write_synthetic_dataset(tmp_path / "data", image, labels, np.eye(4), cases=3, max_displacement=1.5,
                                      sigma=3.0, keypoint_labels=2)
    values = {"method": "network-io", "model": str(tiny_model), "network_iterations": (3,), "network_lr": 1e-2,
              "quiet": True}
    configuration = run_configuration(None, values, {"device": "cpu"})
    outcome = run_dataset(dataset, "val", tmp_path / "run", configuration, report=False, quiet=True)
    assert outcome.done == 2
    pairs = load_dataset(dataset).pairs("val")
    second = pairs[1]
    clear_model_cache()  # "alone": a fresh process would load the checkpoint again
    inputs = _load_pair(second, configuration)  # the runner's reading of the pair (masks included)
    alone = register_inputs(inputs, configuration.settings, device="cpu")
    written = load_field(tmp_path / "run" / second.disp_name)
    assert np.array_equal(written, alone.disp)
    # the check has teeth: fine-tuning moves this pair's field far more than any rounding would
    direct = register_inputs(inputs, make_settings(method="network", model=str(tiny_model), progress=False), device="cpu")
    assert np.abs(direct.disp - alone.disp).max() > 1e-2


def test_the_axis_map_round_trips_images_and_fields():
    axes = AxisMap.parse("0,-2,1")
    image = torch.randn(1, 1, 4, 5, 6)
    mapped = axes.to_network(image)
    assert mapped.shape == (1, 1, 4, 6, 5)
    # network axis 1 is user axis 2 reversed: -1 voxel along it is +1 along user axis 2
    net_field = torch.zeros(1, 3, 4, 6, 5)
    net_field[:, 1] = -1.0
    back = axes.from_network(net_field)
    assert back.shape == (1, 3, 4, 5, 6)
    assert torch.equal(back[:, 2], torch.ones(1, 4, 5, 6)) and back[:, [0, 1]].abs().max() == 0
    assert torch.equal(axes.to_network(image)[0, 0, 1, 2, 3], image[0, 0, 1, 3, 5 - 2])
    with pytest.raises(ValueError, match="permutation"):
        AxisMap.parse("0,0,1")


class _ShiftNet(torch.nn.Module):
    """Predicts, at every voxel, the displacement that moves the image's centre of mass onto the fixed one's."""

    def forward(self, fixed, moving):
        def centre(image):
            grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=image.dtype) for n in image.shape[2:]],
                                              indexing="ij"))
            return (grid * image[:, :1]).flatten(2).sum(-1) / image[:, :1].flatten(2).sum(-1)

        shift = centre(moving) - centre(fixed)
        return shift.view(*shift.shape, 1, 1, 1).expand(-1, -1, *fixed.shape[2:])


def test_a_network_seen_through_an_axis_map_gives_the_same_field_on_the_users_grid():
    fixed, moving = (torch.from_numpy(a)[None, None] for a in (blob(), blob(centre_shift=2.0)))
    plain = NetworkTransform(_ShiftNet()).predict(fixed, moving)
    mapped = NetworkTransform(_ShiftNet(), axes="0,-2,1").predict(fixed, moving)
    assert torch.allclose(plain, mapped, atol=1e-5)


def test_gradicon_term_is_zero_for_inverse_consistent_networks_and_positive_otherwise():
    from dirio.core.context import LevelContext
    from dirio.losses.terms import Evaluation

    fixed, moving = (torch.from_numpy(a)[None, None] for a in (blob(), blob(centre_shift=2.0)))
    ctx = LevelContext(level=0, shape=SHAPE, full_shape=SHAPE, fixed=fixed, moving=moving)
    consistent = NetworkTransform(_ShiftNet())
    value = InverseConsistencyTerm()(Evaluation(ctx, consistent.field(ctx), consistent), "gradicon")
    assert float(value) < 1e-8
    torch.manual_seed(0)
    random = NetworkTransform(LapIRN(start_channel=2))
    assert float(InverseConsistencyTerm()(Evaluation(ctx, random.field(ctx), random), "gradicon")) > 0


def test_options_reach_the_settings_from_the_schema_and_bad_values_are_refused():
    from dirio.config.schema import settings_from_values

    settings = settings_from_values({"method": "nio", "network_axes": "voxelmorph-grid", "network_levels": "1,2",
                                     "network_iterations": "10,5,0", "combine": "pcgrad"})
    assert settings.stages == ("nio",) and settings.network.network_levels == (1, 2)
    stage = settings.stage_options("nio")
    assert stage.combine == "pcgrad" and stage.config.pyramid("nio").iterations == (10, 5, 0)
    assert make_settings(method="network+dense", affine="rigid").stages == ("affine", "network", "dense")
    assert make_settings(method="dense").stages == ("dense",)
    with pytest.raises(DirioError, match="network axes"):
        settings_from_values({"method": "network", "network_axes": "0,1"})
    with pytest.raises(DirioError, match="`network_iterations` of nio: one count per LapIRN level"):
        settings_from_values({"method": "nio", "network_iterations": "10"})
    with pytest.raises(DirioError, match="missing.pt: network checkpoint not found"):
        register(blob(), blob(), method="network", model="missing.pt", progress=False, device="cpu")


def test_the_model_is_loaded_once_per_process(tiny_model, monkeypatch):
    first = load_model(NetworkConfig(model=str(tiny_model)), torch.device("cpu"))
    monkeypatch.setattr(network_methods, "_MODEL_CACHE", dict(network_methods._MODEL_CACHE))
    assert load_model(NetworkConfig(model=str(tiny_model)), torch.device("cpu")) is first


def test_nio_minimises_the_papers_loss_0_6_lncc_plus_0_4_diffusion(tiny_model):
    """NIO paper: ``L = (1 - lambda) LNCC(window 7^3) + lambda diffusion`` with lambda = 0.4."""
    terms = make_settings(method="nio").stage_options("nio").config.terms()
    assert [(t.name, t.role, t.weight) for t in terms] == [("lncc", Role.SIMILARITY, pytest.approx(0.6)),
                                                            ("diffusion", Role.REGULARIZER, pytest.approx(0.4))]
    assert terms[0].function.similarity.window == 7
    # the engine minimises exactly that weighted sum: every logged step's loss is 0.6 lncc + 0.4 diffusion
    result = register(blob(), blob(centre_shift=2.0), method="nio", model=str(tiny_model), device="cpu",
                      progress=False, network_iterations=(2, 1, 1), network_lr=1e-3)
    assert len(result.history) == 4
    for row in result.history:
        assert row["diffusion"] > 0 and row["lncc"] < 0
        assert row["loss"] == pytest.approx(0.6 * row["lncc"] + 0.4 * row["diffusion"], rel=1e-6)
    # another lambda moves both weights: (1 - 0.25, 0.25), never (1, 0.25)
    other = make_settings(method="nio", network_lambda=0.25).stage_options("nio").config.terms()
    assert [t.weight for t in other] == [pytest.approx(0.75), pytest.approx(0.25)]


def test_the_final_field_of_an_optimising_stage_is_computed_on_the_networks_own_inputs(tiny_model):
    """The loss sees the preprocessed images, the network the original ones: with a vanishing learning
    rate, network-io and nio must return direct inference's field (the final pass once fed the network
    the preprocessed images instead, which is another field)."""
    fixed = blob() * 3.0 + np.random.default_rng(0).random(SHAPE).astype(np.float32) * 0.5
    fixed[0, 0, 0] = 50.0  # an outlier: percentile preprocessing and min-max give other intensities
    moving = blob(centre_shift=2.0)
    direct = register(fixed, moving, method="network", model=str(tiny_model), device="cpu", progress=False)
    for method, iterations in (("network-io", (1,)), ("nio", (1, 1, 1))):
        tuned = register(fixed, moving, method=method, model=str(tiny_model), device="cpu", progress=False,
                         network_iterations=iterations, network_lr=1e-30, network_weight_decay=0.0)
        assert np.abs(direct.disp).max() > 1e-3
        assert np.allclose(tuned.disp, direct.disp, atol=1e-6), method
