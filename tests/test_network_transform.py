"""A network is one more transform: a tiny CNN registers a pair through the same engine, terms and
combination rules as the dense field, and its weights are restored bit for bit afterwards."""

import pytest
import torch

from dirio.losses.regularizers import make_regularizer
from dirio.losses.similarity import make_similarity
from dirio.losses.terms import RegularizerTerm, Role, SimilarityTerm, Term
from dirio.optim.pyramid import OptimizerConfig, PyramidConfig, run_pyramid
from dirio.transforms.base import Transform, restored
from dirio.transforms.network import NetworkTransform
from tiny_networks import TinyRegistrationNet, blob_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def terms(weight=0.1):
    return [Term("mse", Role.SIMILARITY, SimilarityTerm(make_similarity("mse")), 1.0),
            Term("diffusion", Role.REGULARIZER, RegularizerTerm(make_regularizer("diffusion")), weight)]


@pytest.mark.parametrize("combine", ["sum", "pcgrad", "surgery"])
def test_a_tiny_network_registers_a_shifted_blob_and_its_weights_are_restored(combine):
    fixed, moving = blob_pair(shift=1.5)
    transform = NetworkTransform(TinyRegistrationNet())
    assert isinstance(transform, Transform)
    before = {k: v.clone() for k, v in transform.state_dict().items()}
    with restored(transform):
        result = run_pyramid(transform, terms(), fixed, moving, PyramidConfig(levels=(1,), iterations=(60,)),
                             OptimizerConfig(optimizer="adam", lr=3e-3, schedule="constant", combine=combine),
                             progress=False)
        assert result.transform is transform
        tuned = {k: v.clone() for k, v in transform.state_dict().items()}
    history = result.history
    assert history[-1]["mse"] < 0.5 * history[0]["mse"], (history[0]["mse"], history[-1]["mse"])
    # fixed(x) = moving(x + u): the fixed blob sits 1.5 voxels lower along axis 0, so u_0 ~ +1.5 at its centre
    centre = result.displacement[0, 0, 10:13, 11:14].mean()
    assert 0.7 < float(centre) < 2.3, float(centre)
    if combine != "sum":
        assert "conflict" in history[-1]
    assert any(not torch.equal(tuned[k], before[k]) for k in before)
    assert all(torch.equal(transform.state_dict()[k], before[k]) for k in before)


def test_weights_are_restored_after_an_error_in_the_middle_of_a_run():
    fixed, moving = blob_pair()
    transform = NetworkTransform(TinyRegistrationNet())
    before = {k: v.clone() for k, v in transform.state_dict().items()}

    class Exploding:
        calls = 0

        def __call__(self, evaluation, name):
            Exploding.calls += 1
            value = (evaluation.field ** 2).mean()
            return value * float("nan") if Exploding.calls > 5 else value

    broken = terms() + [Term("broken", Role.SUPERVISION, Exploding(), 1.0)]
    with pytest.raises(Exception, match="broken loss became nan"):
        with restored(transform):
            run_pyramid(transform, broken, fixed, moving, PyramidConfig(levels=(1,), iterations=(20,)),
                        OptimizerConfig(lr=1e-2, schedule="constant"), progress=False)
    assert all(torch.equal(transform.state_dict()[k], before[k]) for k in before)


def test_network_parameters_are_not_tagged_as_spatial_fields():
    transform = NetworkTransform(TinyRegistrationNet())
    assert transform.spatial_parameters() == []
    assert [len(g["params"]) for g in transform.parameter_groups()] == [len(list(transform.parameters()))]


def test_keypoint_supervision_is_the_mean_squared_distance_after_the_field():
    from dirio.core.context import LevelContext
    from dirio.losses.terms import Evaluation, KeypointSupervision
    from dirio.transforms.dense import DenseDisplacement

    shape = (12, 14)
    transform = DenseDisplacement(shape)
    with torch.no_grad():
        transform.param[0, 0] = 1.5  # u = (1.5, -0.5) everywhere
        transform.param[0, 1] = -0.5
    fixed_points = torch.tensor([[[2.0, 3.0], [7.5, 9.25]]])
    moving_points = fixed_points + torch.tensor([1.0, 0.0])  # the true motion is (1, 0)
    ctx = LevelContext(level=0, shape=shape, full_shape=shape, fixed=torch.zeros(1, 1, *shape),
                       moving=torch.zeros(1, 1, *shape),
                       extra={"fixed_keypoints": fixed_points, "moving_keypoints": moving_points})
    loss = KeypointSupervision()(Evaluation(ctx, transform.field(ctx), transform), "keypoints")
    # every point lands (0.5, -0.5) away from its partner: squared distance 0.5
    assert float(loss.detach()) == pytest.approx(0.5, abs=1e-6)


def test_keypoint_supervision_alone_drives_the_field_to_the_known_motion():
    from dirio.losses.terms import KeypointSupervision

    shape = (16, 16)
    fixed, moving = blob_pair(size=16)
    points = torch.tensor([[[4.0, 4.0], [11.0, 5.0], [8.0, 12.0], [12.0, 12.0]]])

    class WithPoints(KeypointSupervision):
        def prepare(self, ctx, name):
            ctx.extra.update(fixed_keypoints=points, moving_keypoints=points + torch.tensor([2.0, -1.0]))

    from dirio.transforms.dense import DenseDisplacement

    transform = DenseDisplacement(smoothing=2)
    terms_ = [Term("keypoints", Role.SUPERVISION, WithPoints(), 1.0),
              Term("diffusion", Role.REGULARIZER, RegularizerTerm(make_regularizer("diffusion")), 0.01)]
    result = run_pyramid(transform, terms_, fixed, moving, PyramidConfig(levels=(1,), iterations=(150,)),
                         OptimizerConfig(lr=0.2, schedule="constant"), progress=False)
    moved = result.displacement[0, :, 8, 8]
    assert torch.allclose(moved, torch.tensor([2.0, -1.0]), atol=0.3), moved
