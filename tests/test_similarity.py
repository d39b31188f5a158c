"""Specification of dirio.losses.similarity: LNCC, NCC, MSE, MIND-SSC and NMI losses.

Each test builds inputs whose correct loss is known in closed form or computed by an independent
numpy / scipy formula. Shapes are anisotropic so that a swapped axis shows up as an error.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from dirio.core import fields as field
from dirio.core.filters import local_mean
from dirio.losses import lncc, mind, mse, nmi
from dirio.losses import similarity as sim
from dirio.losses.base import masked_mean
from dirio.losses.lncc import LNCC, lncc_map
from dirio.losses.mind import MINDSSC, mind_ssc
from dirio.losses.mse import MSE
from dirio.losses.ncc import NCC
from dirio.losses.nmi import NMI
from dirio.losses.similarity import make_similarity

SHAPES = {3: (10, 11, 12), 2: (17, 19)}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _noise(shape, seed: int = 0, channels: int = 1, batch: int = 1, dtype=torch.float64) -> torch.Tensor:
    """(batch, channels, *shape) standard normal noise: no flat windows anywhere."""
    return torch.randn((batch, channels, *shape), generator=_generator(seed), dtype=dtype)


def _blobs(shape, shift=None) -> torch.Tensor:
    """(1, 1, *shape) smooth analytic image f(x - shift): a sum of anisotropic Gaussian blobs + ramp.

    Smooth (widths of 3-5 voxels) so that a sub-voxel shift is well represented by linear
    interpolation, and textured enough that every measure has a clear optimum.
    """
    ndim = len(shape)
    grid = field.identity_grid(shape, dtype=torch.float64)
    if shift is not None:
        grid = grid - torch.tensor(shift, dtype=torch.float64).view(ndim, *([1] * ndim))
    rng = np.random.default_rng(3)
    image = 0.02 * grid.sum(0)
    for _ in range(8):
        centre = [rng.uniform(2, n - 3) for n in shape]
        width = rng.uniform(2.5, 4.0, size=ndim)
        r2 = sum(((grid[a] - centre[a]) / width[a]) ** 2 for a in range(ndim))
        image = image + rng.uniform(0.5, 1.5) * torch.exp(-0.5 * r2)
    return image[None, None]


# --- local means ----------------------------------------------------------------------------------


def test_local_mean_box_matches_scipy_mean_over_in_volume_window():
    """Box local mean = mean over the part of the 5-voxel window inside the volume (no padding values)."""
    image = _noise(SHAPES[3])
    ours = local_mean(image, window=5).numpy()[0, 0]
    ones = np.ones(SHAPES[3])
    sums = ndi.uniform_filter(image.numpy()[0, 0], size=5, mode="constant") * 125
    counts = ndi.uniform_filter(ones, size=5, mode="constant") * 125
    np.testing.assert_allclose(ours, sums / counts, atol=1e-12)


def test_local_mean_preserves_constants_and_linear_ramps_in_the_interior():
    """A symmetric normalised window maps a constant to itself and a linear ramp to itself away from borders."""
    ramp = field.identity_grid(SHAPES[3], dtype=torch.float64)[1][None, None]
    for kernel in ("box", "gaussian"):
        const = local_mean(torch.full((1, 1, *SHAPES[3]), 3.5, dtype=torch.float64), window=5, kernel=kernel)
        torch.testing.assert_close(const, torch.full_like(const, 3.5))
    out = local_mean(ramp, window=5)
    torch.testing.assert_close(out[:, :, :, 2:-2], ramp[:, :, :, 2:-2])
    # First voxel along axis 1: mean of ramp values 0, 1, 2 (window clipped to the volume) = 1.
    torch.testing.assert_close(out[0, 0, 0, 0, 0], torch.tensor(1.0, dtype=torch.float64))


def test_local_mean_gradient_is_the_transposed_filter():
    """Autograd through the custom separable filter agrees with finite differences."""
    image = _noise((5, 6, 7)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: local_mean(x, window=3, kernel="box"), (image,))
    assert torch.autograd.gradcheck(lambda x: local_mean(x, kernel="gaussian", sigma=0.8), (image,))


# --- LNCC -----------------------------------------------------------------------------------------


def test_lncc_map_matches_hand_computed_values_on_a_ramp_and_its_square():
    """I = [0, 1, 2, 3, 4], J = I^2 along a (1, 1, 5) volume, box window 5 (clipped to the volume).

    Centre voxel: <I> = 2, var_I = 2, <J> = 6, var_J = 70.8 - 36 = 34.8, cross = 20 - 12 = 8,
    cc^2 = 64 / 69.6. First voxel (window 0..2): var_I = 2/3, var_J = 26/9, cross = 4/3,
    cc^2 = (16/9) / (52/27) = 12/13. eps is VoxelMorph's, divided by n^2 = 125^2.
    """
    ramp = torch.arange(5.0, dtype=torch.float64).view(1, 1, 1, 1, 5)
    score = lncc_map(ramp, ramp**2, window=5)
    assert float(score[0, 0, 0, 0, 2]) == pytest.approx(64 / 69.6, rel=1e-9)
    assert float(score[0, 0, 0, 0, 0]) == pytest.approx(12 / 13, rel=1e-9)
    plain = lncc_map(ramp, ramp**2, window=5, squared=False)
    assert float(plain[0, 0, 0, 0, 2]) == pytest.approx(8 / math.sqrt(69.6), rel=1e-9)
    big_eps = lncc_map(ramp, ramp**2, window=5, eps=69.6 * 125**2)
    assert float(big_eps[0, 0, 0, 0, 2]) == pytest.approx(64 / (2 * 69.6), rel=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kernel", ["box", "gaussian"])
def test_lncc_of_image_with_itself_and_positive_affine_copy_is_minus_one(ndim, kernel):
    """cc^2 = 1 wherever the window is not flat, so the squared loss is -1 (up to eps / n^2)."""
    image = _noise(SHAPES[ndim])
    loss = LNCC(kernel=kernel)
    assert float(loss(image, image)) == pytest.approx(-1.0, abs=1e-6)
    assert float(loss(image, 3.0 * image - 7.0)) == pytest.approx(-1.0, abs=1e-6)
    plain = LNCC(kernel=kernel, squared=False)
    assert float(plain(image, 0.5 * image + 2.0)) == pytest.approx(-1.0, abs=1e-6)
    assert float(LNCC(kernel=kernel)(image.float(), image.float())) == pytest.approx(-1.0, abs=1e-4)


def test_plain_lncc_of_negated_image_is_plus_one_and_squared_is_minus_one():
    """Signed cc of I with -I is -1 everywhere, so the plain loss is +1; squared ignores the sign."""
    image = _noise(SHAPES[3])
    assert float(LNCC(squared=False)(image, -image)) == pytest.approx(1.0, abs=1e-6)
    assert float(LNCC(squared=True)(image, -image)) == pytest.approx(-1.0, abs=1e-6)


def test_lncc_of_independent_noise_is_near_zero_and_within_range():
    """Independent images: E[cc^2] over a 125-voxel window is about 1/125, far from -1."""
    a, b = _noise(SHAPES[3], seed=1), _noise(SHAPES[3], seed=2)
    squared = float(LNCC()(a, b))
    plain = float(LNCC(squared=False)(a, b))
    assert -0.05 < squared <= 0.0
    assert -0.1 < plain < 0.1


def _lncc_cases():
    for ndim, kernel, squared, masked in itertools.product((2, 3), ("box", "gaussian"), (True, False), (False, True)):
        name = f"{ndim}d-{kernel}-{'sq' if squared else 'plain'}-{'mask' if masked else 'nomask'}"
        yield pytest.param(ndim, kernel, squared, masked, id=name)


@pytest.mark.parametrize("ndim,kernel,squared,masked", list(_lncc_cases()))
def test_fast_lncc_equals_autograd_reference_in_value_and_gradient(monkeypatch, ndim, kernel, squared, masked):
    """The cache-blocked analytic-gradient path gives the reference's value and gradient.

    The slab size is forced to one row so that every halo / border case of the blocking is used.
    """
    monkeypatch.setattr(lncc, "_LNCC_SLAB_VOXELS", 1)
    shape = SHAPES[ndim]
    fixed = _noise(shape, seed=1, channels=2, batch=2)
    warped = (fixed + _noise(shape, seed=2, channels=2, batch=2)).requires_grad_()
    mask = torch.rand((1, 1, *shape), generator=_generator(3), dtype=torch.float64) if masked else None
    loss = LNCC(window=5, kernel=kernel, squared=squared)
    fast = loss(fixed, warped, mask)
    (grad_fast,) = torch.autograd.grad(fast, warped)
    reference = -masked_mean(lncc_map(fixed, warped, 5, kernel, None, squared), mask)
    (grad_reference,) = torch.autograd.grad(reference, warped)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_fast, grad_reference, rtol=1e-10, atol=1e-14)


def test_fast_lncc_gradient_passes_gradcheck(monkeypatch):
    """Finite differences confirm the analytic LNCC gradient (two-row slabs)."""
    monkeypatch.setattr(lncc, "_LNCC_SLAB_VOXELS", 2 * 6 * 7)
    fixed = _noise((5, 6, 7), seed=1)
    warped = (fixed + _noise((5, 6, 7), seed=2)).requires_grad_()
    for squared in (True, False):
        loss = LNCC(window=3, squared=squared)
        assert torch.autograd.gradcheck(lambda w: loss(fixed, w), (warped,))


def test_lncc_fixed_statistics_cache_follows_in_place_changes():
    """Changing the fixed image in place invalidates the cached fixed statistics."""
    fixed = _noise(SHAPES[3], seed=1)
    warped = _noise(SHAPES[3], seed=2)
    loss = LNCC()
    before = loss(fixed, warped)
    fixed.add_(warped)
    after = loss(fixed, warped)
    torch.testing.assert_close(after, LNCC(cache_fixed=False)(fixed, warped))
    assert float(after) < float(before) - 0.1


def test_lncc_pickles_and_deep_copies_without_its_cache():
    """A used LNCC object can be pickled / deep-copied (for worker processes); the copy recomputes."""
    import copy
    import pickle

    fixed, warped = _noise(SHAPES[3], seed=1), _noise(SHAPES[3], seed=2)
    loss = LNCC(window=3)
    value = loss(fixed, warped)
    for clone in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        assert clone._cache is None and clone.window == 3
        torch.testing.assert_close(clone(fixed, warped), value)


def test_lncc_gaussian_sigma_defaults_to_box_standard_deviation():
    """The Gaussian window's default sigma is the standard deviation of the box: sqrt((w^2-1)/12)."""
    assert LNCC(window=5, kernel="gaussian").sigma == pytest.approx(math.sqrt(2.0))
    assert LNCC(window=9, kernel="gaussian", sigma=1.5).sigma == 1.5


@pytest.mark.parametrize("options", [{"window": 4}, {"window": 0}, {"kernel": "triangle"}, {"sigma": 1.0}, {"eps": 0.0}])
def test_lncc_rejects_invalid_options(options):
    """Even windows, unknown kernels, sigma with a box window and eps <= 0 are errors."""
    with pytest.raises(ValueError):
        LNCC(**options)


# --- NCC, MSE -------------------------------------------------------------------------------------


def test_ncc_matches_numpy_pearson_correlation():
    """Global NCC loss = -Pearson correlation (numpy corrcoef), averaged over batch and channels."""
    fixed = _noise(SHAPES[3], seed=1, channels=2, batch=2)
    warped = fixed + 2.0 * _noise(SHAPES[3], seed=2, channels=2, batch=2)
    expected = np.mean(
        [np.corrcoef(fixed[b, c].numpy().ravel(), warped[b, c].numpy().ravel())[0, 1] for b in range(2) for c in range(2)]
    )
    assert float(NCC()(fixed, warped)) == pytest.approx(-expected, abs=1e-9)
    assert float(NCC()(fixed, -2.0 * fixed + 1.0)) == pytest.approx(1.0, abs=1e-8)  # eps = 1e-8 in the denominator


def test_masked_ncc_matches_numpy_weighted_correlation():
    """With a mask, NCC is the mask-weighted Pearson correlation."""
    fixed, warped = _noise(SHAPES[3], seed=1), _noise(SHAPES[3], seed=2) + _noise(SHAPES[3], seed=1)
    mask = torch.rand((1, 1, *SHAPES[3]), generator=_generator(4), dtype=torch.float64)
    w = mask.numpy().ravel()
    x, y = fixed.numpy().ravel(), warped.numpy().ravel()
    xm, ym = x - np.average(x, weights=w), y - np.average(y, weights=w)
    expected = np.sum(w * xm * ym) / np.sqrt(np.sum(w * xm * xm) * np.sum(w * ym * ym))
    assert float(NCC()(fixed, warped, mask)) == pytest.approx(-expected, abs=1e-8)  # eps = 1e-8


def test_mse_matches_numpy_with_and_without_mask():
    """MSE = mean((F - W)^2); masked: sum(m (F - W)^2) / (C sum m)."""
    fixed, warped = _noise(SHAPES[2], seed=1, channels=3), _noise(SHAPES[2], seed=2, channels=3)
    mask = torch.rand((1, 1, *SHAPES[2]), generator=_generator(4), dtype=torch.float64)
    diff2 = (fixed.numpy() - warped.numpy()) ** 2
    assert float(MSE()(fixed, warped)) == pytest.approx(diff2.mean(), rel=1e-12)
    expected = (diff2 * mask.numpy()).sum() / (3 * mask.numpy().sum())
    assert float(MSE()(fixed, warped, mask)) == pytest.approx(expected, rel=1e-12)


def test_masked_squared_error_blocks_equal_autograd_in_value_and_gradients(monkeypatch):
    """The slab-blocked masked squared error equals masked_mean((W - F)^2) with one-row slabs,
    including the gradients w.r.t. both the warped and the fixed features."""
    monkeypatch.setattr(mse, "_SQUARED_ERROR_SLAB_ELEMENTS", 1)
    fixed = _noise(SHAPES[3], seed=1, channels=2, batch=2).requires_grad_()
    warped = _noise(SHAPES[3], seed=2, channels=2, batch=2).requires_grad_()
    mask = torch.rand((2, 1, *SHAPES[3]), generator=_generator(3), dtype=torch.float64)
    fast = MSE()(fixed, warped, mask)
    grads_fast = torch.autograd.grad(2.0 * fast, (fixed, warped))
    reference = masked_mean((warped - fixed) ** 2, mask)
    grads_reference = torch.autograd.grad(2.0 * reference, (fixed, warped))
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=0)
    for got, expected in zip(grads_fast, grads_reference):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_lncc_gradient_vanishes_exactly_on_zero_background():
    """Where fixed and warped are both exactly 0 over the whole window, statistics, loss terms and
    gradients are exactly 0 (no centring noise on zero backgrounds)."""
    fixed = torch.zeros((1, 1, 16, 11, 12))
    warped = torch.zeros((1, 1, 16, 11, 12))
    fixed[..., :6, :, :] = torch.rand((1, 1, 6, 11, 12), generator=_generator(1))
    warped[..., :6, :, :] = torch.rand((1, 1, 6, 11, 12), generator=_generator(2))
    warped.requires_grad_()
    LNCC()(fixed, warped).backward()
    assert float(warped.grad[..., 6 + 4 :, :, :].abs().max()) == 0.0
    assert float(warped.grad[..., :6, :, :].abs().max()) > 0.0


# --- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lncc", "ncc", "mse", "mind", "nmi"])
def test_masked_out_voxels_do_not_change_the_loss(name):
    """Changing the warped features where the mask is 0 leaves the loss unchanged.

    For LNCC the change is made farther than the window radius (2) from the masked region,
    because LNCC's local statistics at a masked voxel read its neighbours.
    """
    shape = SHAPES[3]
    loss = make_similarity(name)
    fixed = loss.features(_blobs(shape))
    warped = loss.features(_blobs(shape, shift=(1.0, 0.5, -0.5)))
    mask = torch.zeros((1, 1, *shape), dtype=torch.float64)
    mask[..., :5, :, :] = 1.0
    mask[..., 2, 3, 4] = 0.3
    changed = warped.clone()
    start = 8 if name == "lncc" else 5
    changed[..., start:, :, :] = torch.rand(changed[..., start:, :, :].shape, generator=_generator(5), dtype=torch.float64)
    torch.testing.assert_close(loss(fixed, changed, mask), loss(fixed, warped, mask))
    assert not torch.allclose(loss(fixed, changed), loss(fixed, warped))
    torch.testing.assert_close(loss(fixed, warped, torch.ones_like(mask)), loss(fixed, warped))


def test_mask_shape_is_checked():
    """A mask with the wrong spatial shape or several channels is an error."""
    image = _noise(SHAPES[3])
    with pytest.raises(ValueError):
        MSE()(image, image, torch.ones((1, 1, 4, 4, 4), dtype=torch.float64))
    with pytest.raises(ValueError):
        MSE()(image, image, torch.ones((1, 2, *SHAPES[3]), dtype=torch.float64))
    with pytest.raises(ValueError):
        MSE()(image, image[..., :-1])


# --- MIND-SSC -------------------------------------------------------------------------------------


def _mind_oracle(image: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """Independent numpy/scipy MIND-SSC of a 3D array, written from the formula in the docstring."""
    padded = np.pad(image, dilation, mode="edge")
    n = image.shape

    def at(offset):
        return padded[tuple(slice(dilation + o, dilation + o + s) for o, s in zip(offset, n))]

    offsets = []
    for a, b in itertools.combinations(range(3), 2):
        for sa, sb in itertools.product((-1, 1), repeat=2):
            p, q = [0, 0, 0], [0, 0, 0]
            p[a], q[b] = sa * dilation, sb * dilation
            offsets.append((p, q))
    d = np.stack([ndi.uniform_filter((at(p) - at(q)) ** 2, size=2 * radius + 1, mode="nearest") for p, q in offsets])
    d = d - d.min(axis=0)
    v = d.mean(axis=0)
    v = np.clip(v, 1e-3 * v.mean(), 1e3 * v.mean())
    return np.exp(-d / v)


@pytest.mark.parametrize("radius,dilation", [(2, 2), (1, 1), (0, 3)])
def test_mind_features_match_independent_numpy_formula(radius, dilation):
    """12 channels: exp(-(D - min D) / clamp(mean D')), D = box-filtered squared pair differences."""
    image = _blobs(SHAPES[3]) + 0.1 * _noise(SHAPES[3])
    ours = MINDSSC(radius=radius, dilation=dilation).features(image)
    assert ours.shape == (1, 12, *SHAPES[3])
    np.testing.assert_allclose(ours[0].numpy(), _mind_oracle(image[0, 0].numpy(), radius, dilation), rtol=1e-10, atol=1e-12)


def test_mind_pairs_are_the_twelve_sqrt2_pairs_of_the_six_neighbourhood():
    """3D: all 12 unordered pairs of six-neighbourhood members sqrt(2)*d apart; 2D: the 4 such pairs."""
    for ndim, count in ((3, 12), (2, 4)):
        pairs = mind._mind_ssc_pairs(ndim, 2)
        assert len(pairs) == count
        assert len({frozenset(pair) for pair in pairs}) == count
        for p, q in pairs:
            assert sum(abs(v) for v in p) == 2 and sum(abs(v) for v in q) == 2
            assert sum((a - b) ** 2 for a, b in zip(p, q)) == 8


@pytest.mark.parametrize("ndim", [2, 3])
def test_mind_is_invariant_to_affine_intensity_changes_and_maximal_at_one(ndim):
    """MIND(a I + b) == MIND(I); each voxel's descriptor lies in (0, 1] with maximum exactly 1."""
    image = _noise(SHAPES[ndim])
    features = mind_ssc(image)
    torch.testing.assert_close(mind_ssc(2.5 * image + 100.0), features, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(mind_ssc(-0.3 * image), features, rtol=1e-8, atol=1e-10)
    assert features.shape[1] == (12 if ndim == 3 else 4)
    assert float(features.min()) > 0.0
    torch.testing.assert_close(features.amax(dim=1), torch.ones_like(features[:, 0]))


def test_mind_of_constant_image_is_all_ones_not_nan():
    """Zero patch distances everywhere give finite all-ones descriptors."""
    features = mind_ssc(torch.full((1, 1, *SHAPES[3]), 7.0))
    torch.testing.assert_close(features, torch.ones_like(features))


def test_mind_mse_of_image_with_itself_is_zero_and_channels_multiply():
    """MIND-MSE(I, I) = 0; a multi-channel image gives 12 descriptors per channel."""
    image = _noise(SHAPES[3], channels=2)
    loss = MINDSSC()
    features = loss.features(image)
    assert features.shape == (1, 24, *SHAPES[3])
    assert float(loss(features, features)) == 0.0
    torch.testing.assert_close(features[:, 12:], mind_ssc(image[:, 1:]))


def test_mind_autograd_path_equals_in_place_path():
    """Features computed with gradient tracking equal those of the in-place no-grad path."""
    image = _noise(SHAPES[3])
    with_grad = mind_ssc(image.clone().requires_grad_())
    torch.testing.assert_close(with_grad.detach(), mind_ssc(image))
    assert with_grad.requires_grad


# --- NMI ------------------------------------------------------------------------------------------


def _parzen(values: np.ndarray, bins: int, sigma: float) -> np.ndarray:
    centres = np.arange(bins)
    w = np.exp(-0.5 * ((values[:, None] - centres[None]) / sigma) ** 2)
    return w / w.sum(1, keepdims=True)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_nmi_of_two_valued_image_with_itself_matches_analytic_parzen_value():
    """Half the voxels at the minimum (bin 0), half at the maximum (last bin): closed form from the Parzen weights.

    With weights w0, w1 for the two values, P_A = (w0 + w1) / 2 and P_AB = (w0 w0^T + w1 w1^T) / 2.
    For sigma -> 0 this tends to the textbook maximum NMI = 2 (H(A) = H(A, B) = log 2).
    """
    image = torch.zeros((1, 1, 6, 7, 8), dtype=torch.float64)
    image[..., :3, :, :] = 1.0
    bins, sigma = 16, 0.5
    w0, w1 = _parzen(np.array([0.0]), bins, sigma)[0], _parzen(np.array([bins - 1.0]), bins, sigma)[0]
    marginal = 0.5 * (w0 + w1)
    joint = 0.5 * (np.outer(w0, w0) + np.outer(w1, w1))
    expected = 2 * _entropy(marginal) / _entropy(joint)
    assert float(NMI(bins=bins, sigma=sigma)(image, image)) == pytest.approx(-expected, rel=1e-10)
    assert float(NMI(bins=bins, sigma=0.05)(image, image)) == pytest.approx(-2.0, abs=1e-8)


def test_nmi_of_image_with_itself_beats_shuffled_copy_and_stays_in_range():
    """NMI(I, I) > NMI(I, shuffled I); both values in [1, 2] (losses in [-2, -1])."""
    image = _blobs(SHAPES[3])
    perm = torch.randperm(image.numel(), generator=_generator(1))
    shuffled = image.flatten()[perm].view_as(image)
    loss = NMI()
    same, other = float(loss(image, image)), float(loss(image, shuffled))
    assert -2.0 <= same < other <= -1.0
    assert same < other - 0.2


def _dense_joint_histogram(a, b, m, bins, sigma):
    """Autograd formula of the Parzen joint histogram for one row: (N,) values -> (bins, bins)."""
    def weights(v):
        t = ((v - v.detach().min()) / (v.detach().max() - v.detach().min()) * (bins - 1)).clamp(0, bins - 1)
        g = torch.exp(-0.5 * ((t[:, None] - torch.arange(bins, dtype=v.dtype)) / sigma) ** 2)
        return g / g.sum(1, keepdim=True)

    wa, wb = weights(a), weights(b)
    return (wa * m[:, None]).T @ wb / m.sum()


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_parzen_histogram_equals_dense_autograd_formula(monkeypatch, masked):
    """The chunked joint histogram and its analytic gradients (w.r.t. both images) equal the
    dense autograd formula; chunks of 7 voxels exercise the chunk boundaries."""
    monkeypatch.setattr(nmi, "_NMI_CHUNK_VOXELS", 7)
    shape = (4, 5, 6)
    fixed = _noise(shape, seed=1).requires_grad_()
    warped = (0.5 * fixed.detach() + _noise(shape, seed=2)).requires_grad_()
    mask = (torch.rand((1, 1, *shape), generator=_generator(3), dtype=torch.float64) + 0.2).clamp(max=1.0) if masked else None
    loss = NMI(bins=8, sigma=0.7)
    joint = loss.joint_histogram(fixed, warped, mask)
    m = torch.ones(fixed.numel(), dtype=torch.float64) if mask is None else mask.flatten()
    dense = _dense_joint_histogram(fixed.flatten(), warped.flatten(), m, 8, 0.7)
    torch.testing.assert_close(joint[0], dense, rtol=1e-12, atol=1e-15)
    probe = torch.rand((8, 8), generator=_generator(4), dtype=torch.float64)
    grads = torch.autograd.grad((joint[0] * probe).sum(), (fixed, warped))
    grads_dense = torch.autograd.grad((dense * probe).sum(), (fixed, warped))
    for got, expected in zip(grads, grads_dense):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    # A fixed intensity range: with the default (detached) min / max, perturbing an extreme voxel
    # would move the bins, which the gradient deliberately ignores.
    ranged = NMI(bins=8, sigma=0.7, intensity_range=(-6.0, 6.0))
    assert torch.autograd.gradcheck(lambda w: ranged(fixed.detach(), w, mask), (warped,))


def test_nmi_intensity_range_and_sampling_are_deterministic():
    """A fixed intensity range maps values to the same bins for both images; sampling is seeded."""
    fixed, warped = _blobs(SHAPES[3]), _blobs(SHAPES[3], shift=(1.0, 0.0, 0.0))
    full = float(NMI()(fixed, warped))
    sampled = NMI(samples=800, seed=4)
    torch.testing.assert_close(sampled(fixed, warped), sampled(fixed, warped))
    assert float(sampled(fixed, warped)) == pytest.approx(full, abs=0.05)
    ranged = NMI(intensity_range=(float(fixed.min()), float(fixed.max())))
    assert float(ranged(fixed, fixed)) == pytest.approx(float(NMI()(fixed, fixed)), rel=1e-12)


# --- gradients through warping and registration direction -----------------------------------------


@pytest.mark.parametrize("name", ["lncc", "ncc", "mse", "mind", "nmi"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_loss_gradient_through_warp_is_finite_and_nonzero(name, ndim):
    """d loss / d displacement through dirio.core.fields.warp exists, is finite and not identically zero."""
    shape = SHAPES[ndim]
    shift = (0.8,) + (0.0,) * (ndim - 1)
    loss = make_similarity(name)
    fixed = loss.features(_blobs(shape).float())
    moving = loss.features(_blobs(shape, shift=shift).float())
    disp = torch.zeros((1, ndim, *shape), requires_grad=True)
    value = loss(fixed, field.warp(moving, disp))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(disp.grad).all()
    assert float(disp.grad.abs().max()) > 0.0


@pytest.mark.parametrize("name", ["lncc", "ncc", "mse", "mind", "nmi"])
def test_each_loss_is_lower_at_the_true_shift_than_at_zero(name):
    """moving(x) = f(x - t) and fixed = f: warping by u = t restores f, so loss(u = t) < loss(u = 0)."""
    shape = (20, 22, 24)
    shift = (1.5, -1.0, 0.5)
    loss = make_similarity(name)
    fixed = loss.features(_blobs(shape))
    moving = loss.features(_blobs(shape, shift=shift))
    truth = torch.tensor(shift, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    at_truth = float(loss(fixed, field.warp(moving, truth)))
    at_zero = float(loss(fixed, field.warp(moving, torch.zeros_like(truth))))
    assert at_truth < at_zero


# --- factory --------------------------------------------------------------------------------------


def test_factory_builds_every_measure_with_its_options():
    """Each factory name gives the matching class with the options passed through."""
    assert isinstance(make_similarity("lncc", window=7, kernel="gaussian"), LNCC)
    assert make_similarity("lncc", window=7).window == 7
    assert isinstance(make_similarity("ncc"), NCC)
    assert isinstance(make_similarity("mse"), MSE)
    assert make_similarity("mind", radius=1, dilation=3).dilation == 3
    assert make_similarity("nmi", bins=16).bins == 16
    for name in sim.SIMILARITIES:
        assert make_similarity(name).name == name


def test_factory_rejects_unknown_names_and_options_listing_the_valid_ones():
    """Unknown names list the valid names; unknown options list the measure's valid options."""
    with pytest.raises(ValueError, match="lncc, ncc, mse, mind, nmi"):
        make_similarity("ssim")
    with pytest.raises(ValueError, match="window, kernel, sigma, squared, eps"):
        make_similarity("lncc", radius=3)
    with pytest.raises(ValueError, match="none"):
        make_similarity("mse", eps=1.0)
