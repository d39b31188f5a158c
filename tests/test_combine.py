"""Gradient combination rules: the projection maths on small hand-made gradients, the random
choices and their frequencies, reproducibility, scopes (global, tensor, block), the number of
backward passes, and the rules inside the engine."""

import math

import pytest
import torch

from dirio.optim.combine import COMBINE_RULES, GradientSurgery, PCGrad, WeightedSum, make_combine_rule
from dirio.optim.projection import Scope, block_map, block_sums, project_conflicting
from dirio.losses.terms import Role
from engine_helpers import EngineConfig, Objective, optimise

# the roles of the two objectives of these tests
ROLES = {"sim": Role.SIMILARITY, "reg": Role.REGULARIZER}


pytestmark = pytest.mark.usefixtures("one_thread")


# Two conflicting 2-vectors: <s, r> = -1, ||s||^2 = 1, ||r||^2 = 2.
SIM = torch.tensor([1.0, 0.0])
REG = torch.tensor([-1.0, 1.0])
# Hand-computed projections: s onto the normal plane of r, and r onto that of s.
SIM_PROJECTED = torch.tensor([0.5, 0.5])  # s - (-1 / 2) r
REG_PROJECTED = torch.tensor([0.0, 1.0])  # r - (-1 / 1) s
UPDATE_SIM_PROJECTED = SIM_PROJECTED + REG  # (-0.5, 1.5)
UPDATE_REG_PROJECTED = SIM + REG_PROJECTED  # (1.0, 1.0)


def grads(*vectors):
    """Objectives, each with a single parameter tensor."""
    return [[v.clone()] for v in vectors]


# --- the projection ----------------------------------------------------------------------------------


def test_projecting_the_similarity_gives_the_hand_computed_update_and_orthogonality():
    update, result = PCGrad(project="similarity").combine(grads(SIM, REG))
    assert torch.allclose(result.grads[0][0], SIM_PROJECTED)
    assert torch.allclose(update[0], UPDATE_SIM_PROJECTED)
    assert float(result.grads[0][0] @ REG) == pytest.approx(0.0, abs=1e-7)
    assert result.projected.tolist() == [[True], [False]]


def test_projecting_the_regulariser_gives_the_hand_computed_update_and_orthogonality():
    update, result = PCGrad(project="regularizer").combine(grads(SIM, REG))
    assert torch.allclose(update[0], UPDATE_REG_PROJECTED)
    assert float(result.grads[1][0] @ SIM) == pytest.approx(0.0, abs=1e-7)


def test_original_pcgrad_projects_both_gradients_and_sums_them_not_averages():
    update, _ = PCGrad(project="all").combine(grads(SIM, REG))
    # (0.5, 0.5) + (0, 1): the sum; an average would be (0.25, 0.75)
    assert torch.allclose(update[0], SIM_PROJECTED + REG_PROJECTED)


@pytest.mark.parametrize("project", ["random", "similarity", "regularizer", "all"])
@pytest.mark.parametrize("scope", ["global", "level", "tensor", "block"])
def test_gradients_that_do_not_conflict_are_summed_unchanged(project, scope):
    s = torch.randn(1, 2, 9, 10, generator=torch.Generator().manual_seed(1))
    r = 0.3 * s + 0.01 * torch.rand(1, 2, 9, 10, generator=torch.Generator().manual_seed(2)).abs()
    r = torch.where(s * r >= 0, r, torch.zeros_like(r))  # non-negative products everywhere: no conflict anywhere
    update, result = PCGrad(project=project, scope=scope, block_size=4).combine(grads(s, r))
    assert torch.equal(update[0], s + r)
    assert not result.projected.any()
    assert not result.conflict.any()


def test_random_choice_projects_each_gradient_half_of_the_time():
    rule = PCGrad(project="random", generator=torch.Generator().manual_seed(3))
    steps = 4000
    similarity_projected = 0
    for _ in range(steps):
        update, result = rule.combine(grads(SIM, REG))
        if bool(result.projected[0, 0]):
            similarity_projected += 1
            assert torch.allclose(update[0], UPDATE_SIM_PROJECTED)
        else:
            assert torch.allclose(update[0], UPDATE_REG_PROJECTED)
        assert int(result.projected[:, 0].sum()) == 1  # exactly one of the two is projected
    # binomial(4000, 1/2): standard deviation 0.0079 of the fraction; 4 sigma
    assert abs(similarity_projected / steps - 0.5) < 0.032


def test_with_three_objectives_each_is_kept_unprojected_a_third_of_the_time():
    # three unit vectors 120 degrees apart: every pair conflicts
    vectors = [torch.tensor([math.cos(a), math.sin(a)]) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    rule = PCGrad(project="random", generator=torch.Generator().manual_seed(4))
    kept = [0, 0, 0]
    steps = 3000
    for _ in range(steps):
        _, result = rule.combine(grads(*vectors))
        unprojected = (~result.projected[:, 0]).nonzero().flatten().tolist()
        assert len(unprojected) == 1  # the top-priority objective only
        kept[unprojected[0]] += 1
    # binomial(3000, 1/3): standard deviation 0.0086; 4 sigma
    assert all(abs(k / steps - 1 / 3) < 0.035 for k in kept)


def test_random_choices_are_reproducible_under_a_seed_and_change_with_it():
    def sequence(seed):
        rule = PCGrad(project="random", scope="block", block_size=2, generator=torch.Generator().manual_seed(seed))
        s = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(0))
        r = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(1))
        return torch.stack([rule.combine(grads(s, r), spatial=[True])[0][0] for _ in range(5)])

    assert torch.equal(sequence(7), sequence(7))
    assert not torch.equal(sequence(7), sequence(8))


def test_surgery_keeps_the_similarity_gradient_only():
    update, _ = GradientSurgery().combine([SIM.clone()], [REG.clone()])
    assert torch.allclose(update[0], SIM_PROJECTED)
    agreeing, _ = GradientSurgery().combine([SIM.clone()], [torch.tensor([1.0, 1.0])])
    assert torch.equal(agreeing[0], SIM)


# --- scopes -------------------------------------------------------------------------------------------


def test_block_sums_and_block_map_match_a_loop_on_an_uneven_grid():
    values = torch.arange(35.0).reshape(5, 7)
    sums = block_sums(values, 3)
    assert sums.shape == (2, 3)
    for bi in range(2):
        for bj in range(3):
            assert float(sums[bi, bj]) == float(values[3 * bi:3 * bi + 3, 3 * bj:3 * bj + 3].sum())
    spread = block_map(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), 3, (5, 7))
    assert spread.shape == (5, 7)
    assert float(spread[4, 6]) == 6.0 and float(spread[2, 3]) == 2.0 and float(spread[3, 0]) == 4.0


def two_region_field():
    """A 2D field (1, 2, 8, 16): the left 8x8 block conflicts, the right one agrees, and the
    global inner product is exactly 0 (64 * (-1) + 64 * (+1))."""
    s = torch.zeros(1, 2, 8, 16)
    s[:, 0] = 1.0  # (1, 0) everywhere
    r = torch.zeros(1, 2, 8, 16)
    r[:, 0, :, :8], r[:, 1, :, :8] = -1.0, 1.0  # (-1, 1): conflicts
    r[:, 0, :, 8:], r[:, 1, :, 8:] = 1.0, 1.0  # (1, 1): agrees
    return s, r


def test_block_scope_projects_only_the_conflicting_block_where_a_global_scope_sees_no_conflict():
    s, r = two_region_field()
    global_update, global_result = GradientSurgery(scope="global").combine([s], [r])
    assert torch.equal(global_update[0], s)
    assert not global_result.conflict.any()
    block_update, block_result = GradientSurgery(scope="block", block_size=8).combine([s], [r], spatial=[True])
    left, right = block_update[0][..., :8], block_update[0][..., 8:]
    assert torch.allclose(left[:, 0], torch.full((1, 8, 8), 0.5)) and torch.allclose(left[:, 1], torch.full((1, 8, 8), 0.5))
    assert torch.equal(right, s[..., 8:])
    assert block_result.conflict.tolist() == [True, False]
    # orthogonal to the regulariser's gradient inside the projected block
    assert float((left * r[..., :8]).sum()) == pytest.approx(0.0, abs=1e-5)


def test_block_scope_in_3d_is_orthogonal_per_block_and_sums_to_the_global_inner_product():
    generator = torch.Generator().manual_seed(5)
    s, r = torch.randn(1, 3, 7, 9, 10, generator=generator), torch.randn(1, 3, 7, 9, 10, generator=generator)
    scope = Scope("block", 4)
    assert scope.unit_count([s], [True]) == 2 * 3 * 3
    assert float(scope.dots([s], [r], [True]).sum()) == pytest.approx(float((s * r).sum()), rel=1e-5)
    projected = project_conflicting([[s], [r]], scope, torch.tensor([[0.0] * 18, [1.0] * 18]), spatial=[True]).grads[0]
    after = scope.dots(projected, [r], [True])
    before = scope.dots([s], [r], [True])
    assert torch.allclose(after[before < 0], torch.zeros(int((before < 0).sum())), atol=1e-4)
    assert torch.allclose(after[before >= 0], before[before >= 0])


def test_block_scope_treats_untagged_tensors_as_one_unit_whatever_their_rank():
    # a Conv3d weight (out, in, k, k, k) has the rank of a 3D field but is no spatial field:
    # only the tensors the transform tags as spatial are cut into blocks
    generator = torch.Generator().manual_seed(2)
    weight, field = torch.randn(4, 2, 3, 3, 3, generator=generator), torch.randn(1, 3, 8, 8, 8, generator=generator)
    scope = Scope("block", 4)
    assert scope.unit_count([weight, field], [False, True]) == 1 + 8
    dots = scope.dots([weight, field], [weight, field], [False, True])
    assert dots.shape == (9,) and float(dots[0]) == pytest.approx(float((weight * weight).sum()), rel=1e-6)
    assert scope.unit_count([weight, field]) == 2  # untagged: one unit per tensor


def test_tensor_scope_decides_per_parameter_tensor():
    # tensor A conflicts, tensor B agrees, and globally they cancel: only A is projected
    sim = [SIM.clone(), torch.tensor([1.0, 0.0])]
    reg = [REG.clone(), torch.tensor([1.0, 1.0])]
    update, _ = GradientSurgery(scope="tensor").combine(sim, reg)
    assert torch.allclose(update[0], SIM_PROJECTED) and torch.equal(update[1], sim[1])
    unchanged, _ = GradientSurgery(scope="global").combine([s.clone() for s in sim], reg)
    assert torch.equal(unchanged[0], SIM) and torch.equal(unchanged[1], sim[1])


# --- the rules with autograd -------------------------------------------------------------------------


class CountBackward(torch.autograd.Function):
    """Identity whose backward counts how many backward passes go through it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad


def quadratic_losses(param):
    """Similarity and regulariser with gradients SIM and 2 * REG at ``param = 0`` (weights apply later)."""
    x = CountBackward.apply(param)
    return {"sim": (SIM * x).sum() + (x**2).sum(), "reg": 2.0 * (REG * x).sum()}


@pytest.mark.parametrize("name, passes", [("sum", 1), ("pcgrad", 2), ("surgery", 2)])
def test_backward_passes_sum_one_and_projections_one_per_objective(name, passes):
    param = torch.zeros(2, requires_grad=True)
    CountBackward.calls = 0
    make_combine_rule(name).backward(quadratic_losses(param), {"sim": 1.0, "reg": 0.5}, ROLES, [param])
    assert CountBackward.calls == passes


def test_pcgrad_backward_applies_weights_and_sets_the_hand_computed_gradient():
    param = torch.zeros(2, requires_grad=True)
    rule = PCGrad(project="similarity")
    diagnostics = rule.backward(quadratic_losses(param), {"sim": 1.0, "reg": 0.5}, ROLES, [param])
    # weighted gradients: SIM and 0.5 * 2 * REG = REG
    assert torch.allclose(param.grad, UPDATE_SIM_PROJECTED)
    assert diagnostics["cosine"] == pytest.approx(-1 / math.sqrt(2))
    assert diagnostics["conflict"] == 1.0 and diagnostics["projected_similarity"] == 1.0
    assert diagnostics["projected_regularizer"] == 0.0
    assert diagnostics["grad_norm_sim"] == pytest.approx(1.0) and diagnostics["grad_norm_reg"] == pytest.approx(math.sqrt(2))


def test_surgery_ignores_the_regulariser_weight():
    results = []
    for weight in (0.01, 1.0, 100.0):
        param = torch.zeros(2, requires_grad=True)
        GradientSurgery().backward(quadratic_losses(param), {"sim": 1.0, "reg": weight}, ROLES, [param])
        results.append(param.grad.clone())
    assert all(torch.allclose(r, SIM_PROJECTED) for r in results)


def test_diagnosed_sum_gives_the_same_gradient_as_the_one_pass_sum():
    weights = {"sim": 1.0, "reg": 0.3}
    plain = torch.zeros(2, requires_grad=True)
    WeightedSum().backward(quadratic_losses(plain), weights, ROLES, [plain])
    diagnosed = torch.zeros(2, requires_grad=True)
    out = WeightedSum(diagnose=True).backward(quadratic_losses(diagnosed), weights, ROLES, [diagnosed])
    assert torch.allclose(plain.grad, diagnosed.grad)
    assert out["conflict"] == 1.0 and out["projected_similarity"] == 0.0


def test_a_zero_regulariser_gradient_is_no_conflict_and_leaves_the_sum():
    param = torch.zeros(2, requires_grad=True)
    losses = {"sim": (SIM * param).sum(), "reg": (param**2).sum()}  # zero gradient at 0
    diagnostics = PCGrad().backward(losses, {"sim": 1.0, "reg": 1.0}, ROLES, [param])
    assert torch.equal(param.grad, SIM)
    assert math.isnan(diagnostics["cosine"]) and diagnostics["conflict"] == 0.0


def test_conflict_rate_is_the_running_fraction_of_conflicting_steps():
    rule = PCGrad()
    rates = []
    for conflicting in (True, False, True, True):
        param = torch.zeros(2, requires_grad=True)
        other = REG if conflicting else torch.tensor([1.0, 1.0])
        losses = {"sim": (SIM * param).sum(), "reg": (other * param).sum()}
        rates.append(rule.backward(losses, {"sim": 1.0, "reg": 1.0}, ROLES, [param])["conflict_rate"])
    assert rates == [1.0, 0.5, 2 / 3, 0.75]


def test_unknown_rule_scope_or_option_is_rejected_with_the_valid_choices():
    with pytest.raises(ValueError, match="sum, pcgrad, surgery"):
        make_combine_rule("mgda")
    with pytest.raises(ValueError, match="scope"):
        make_combine_rule("pcgrad", scope="voxel")
    with pytest.raises(ValueError, match="valid options: project, scope, block_size"):
        make_combine_rule("pcgrad", lambda_=1)
    with pytest.raises(ValueError, match="block_size"):
        make_combine_rule("surgery", scope="block", block_size=0)
    assert set(COMBINE_RULES) == {"sum", "pcgrad", "surgery"}


# --- in the engine ------------------------------------------------------------------------------------


class MeanSquares:
    def features(self, image):
        return image

    def __call__(self, fixed, warped, mask=None):
        return ((fixed - warped) ** 2).mean()


def diffusion(u):
    return sum((u.diff(dim=d) ** 2).mean() for d in range(2, u.dim()))


def small_pair():
    """A 2D pair: a Gaussian blob (moving, centre 12) and the same blob at 10.5 along axis 0 (fixed)."""
    grid = torch.stack(torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij"))
    moving = torch.exp(-((grid - 12.0) ** 2).sum(0) / 30.0)[None, None]
    fixed = torch.exp(-(((grid[0] - 10.5) ** 2) + (grid[1] - 12.0) ** 2) / 30.0)[None, None]
    return fixed, moving


def run_engine(combine, options=None, seed=0, early_stop="none"):
    fixed, moving = small_pair()
    objectives = [Objective("mse", "similarity", MeanSquares(), 1.0), Objective("diffusion", "regularizer", diffusion, 0.1)]
    config = EngineConfig(levels=(1,), iterations=(25,), lr=0.2, smoothing=1, combine=combine,
                          combine_options=options or {}, seed=seed, progress=False, early_stop=early_stop)
    return optimise(fixed, moving, objectives, config)


@pytest.mark.parametrize("combine, options", [("pcgrad", {}), ("pcgrad", {"scope": "block", "block_size": 8}),
                                              ("surgery", {}), ("surgery", {"scope": "block", "block_size": 6})])
def test_engine_logs_the_diagnostics_and_registers_the_shift(combine, options):
    result = run_engine(combine, options)
    row = [r for r in result.history if r["lr"] > 0][-1]  # the last row (at lr 0, no step) has none
    for key in ("cosine", "conflict", "conflict_rate", "projected_similarity", "projected_regularizer"):
        assert key in row
    # fixed(x) = moving(x + u): the fixed blob sits 1.5 voxels lower along axis 0, so u_0 ~ +1.5 there
    assert 1.0 < float(result.displacement[0, 0, 10, 12]) < 2.0


def test_engine_runs_are_reproducible_under_the_seed():
    first = run_engine("pcgrad", {"scope": "block", "block_size": 4}, seed=3)
    again = run_engine("pcgrad", {"scope": "block", "block_size": 4}, seed=3)
    assert torch.equal(first.displacement, again.displacement)
    assert [h.get("projected_similarity") for h in first.history] == [h.get("projected_similarity") for h in again.history]


def test_engine_sum_rule_logs_no_diagnostics_by_default():
    assert "cosine" not in run_engine("sum").history[-1]
