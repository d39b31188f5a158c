"""The CPU fast paths of the full-resolution iteration (issue 12) give the reference's values bit for bit.

* :func:`dirio.core.fields.sample` splits a 3D CPU ``grid_sample`` of one image into one batch item
  per thread (PyTorch runs a 3D item on one thread): values and coordinate gradients must equal
  one plain ``F.grid_sample`` call exactly (tolerance 0), in every mode and padding, with and
  without masks in a similarity term; 2D is never split.
* :func:`dirio.core.fields.voxel_to_grid_sample` scales the components straight into their reversed
  places (no ``flip`` copy): values, strides and gradients equal the plain expression exactly.
* :func:`dirio.core.filters.box_smooth` and its adjoint work slab by slab on large CPU tensors:
  the result must equal the whole-tensor computation exactly (tolerance 0), and the adjoint stays
  the transpose (float64 gradcheck on tiny grids).
* :func:`dirio.core.filters.separable_filter` (the Gaussian of the image pyramid) sums shifted
  views instead of running a one-channel convolution per axis: the values must equal the
  convolution's to float rounding (the convolution's own summation order varies with the shape),
  in 2D and 3D, with every padding, and its gradient passes gradcheck.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dirio.core import fields, filters
from dirio.core.context import LevelContext
from dirio.losses.lncc import LNCC
from dirio.losses.terms import Evaluation, SimilarityTerm


@pytest.fixture
def split_small(monkeypatch):
    """Split even tiny grids into two pieces, as on a two-thread machine."""
    monkeypatch.setattr(fields, "_CHUNK_MIN_VOXELS", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)


def _reference_sample(image, coords, mode, padding):
    """One ``grid_sample`` call (what :func:`fields.sample` computed before the split)."""
    grid = fields.voxel_to_grid_sample(coords, image.shape[2:])
    torch_mode = "bilinear" if mode == "linear" else "nearest"
    return F.grid_sample(image, grid, mode=torch_mode, padding_mode=padding, align_corners=True)


def _coords(shape, amplitude, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, len(shape), *shape), generator=generator, dtype=dtype)
    return fields.identity_grid(shape, dtype=dtype).unsqueeze(0) + amplitude * noise


@pytest.mark.parametrize("shape", [(6, 7, 8), (5, 7, 9)])  # first axis even (view) and odd (padded copy)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["border", "zeros", "reflection"])
def test_split_3d_sample_equals_one_grid_sample_call_bit_for_bit(split_small, shape, channels, mode, padding):
    assert fields._cpu_chunks(torch.zeros(1, 1, *shape), torch.zeros(1, *shape, 3)) == 2
    image = torch.rand(1, channels, *shape, generator=torch.Generator().manual_seed(1))
    coords = _coords(shape, 2.0).requires_grad_(True)
    got = fields.sample(image, coords, mode, padding)
    expected = _reference_sample(image, coords, mode, padding)
    assert got.shape == expected.shape and torch.equal(got, expected)
    if mode == "linear":
        upstream = torch.randn_like(got)
        (grad_got,) = torch.autograd.grad(got, coords, upstream)
        (grad_expected,) = torch.autograd.grad(expected, coords, upstream)
        assert torch.equal(grad_got, grad_expected)


def test_2d_and_images_that_need_a_gradient_are_not_split(split_small):
    assert fields._cpu_chunks(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8, 2)) == 1
    image = torch.rand(1, 1, 6, 7, 8, requires_grad=True)
    assert fields._cpu_chunks(image, torch.zeros(1, 6, 7, 8, 3)) == 1
    assert fields._cpu_chunks(torch.zeros(2, 1, 6, 7, 8), torch.zeros(2, 6, 7, 8, 3)) == 1


def test_split_sample_passes_float64_gradcheck_on_a_tiny_grid(split_small):
    image = torch.rand(1, 2, 4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # away from voxel boundaries (trilinear interpolation has kinks there)
    coords = (fields.identity_grid((4, 5, 6), dtype=torch.float64).unsqueeze(0) + 0.37).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: fields.sample(image, c, "linear", "border"), (coords,))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("masks", [False, True])
def test_lncc_term_gradient_is_unchanged_by_the_split(monkeypatch, ndim, masks):
    """The similarity term of the dense stage (warp + LNCC, masks warped too): same loss and field
    gradient, bit for bit, with the split forced and with it switched off."""
    shape = (10, 11, 12)[:ndim]
    generator = torch.Generator().manual_seed(3)
    fixed, moving = torch.rand(1, 1, *shape, generator=generator), torch.rand(1, 1, *shape, generator=generator)
    fixed_mask = (torch.rand(1, 1, *shape, generator=generator) > 0.3).float() if masks else None
    moving_mask = (torch.rand(1, 1, *shape, generator=generator) > 0.3).float() if masks else None
    ctx = LevelContext(level=0, shape=shape, full_shape=shape, fixed=fixed, moving=moving,
                       fixed_mask=fixed_mask, moving_mask=moving_mask)
    term = SimilarityTerm(LNCC(window=5))
    term.prepare(ctx, "lncc")
    field = 1.5 * torch.randn(1, ndim, *shape, generator=generator)

    def loss_and_grad():
        leaf = field.clone().requires_grad_(True)
        loss = term(Evaluation(ctx, leaf, transform=None), "lncc")
        return loss, torch.autograd.grad(loss, leaf)[0]

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(fields, "_CHUNK_MIN_VOXELS", 1 << 40)
    loss_ref, grad_ref = loss_and_grad()
    monkeypatch.setattr(fields, "_CHUNK_MIN_VOXELS", 8)
    loss_split, grad_split = loss_and_grad()
    assert torch.equal(loss_ref, loss_split) and torch.equal(grad_ref, grad_split)


@pytest.mark.parametrize("shape", [(5, 6, 7), (6, 7)])
@pytest.mark.parametrize("batch", [1, 2])
def test_grid_coordinates_equal_the_plain_expression_bit_for_bit(shape, batch):
    ndim = len(shape)
    coords = _coords(shape, 2.0).expand(batch, *([-1] * (ndim + 1))).clone().requires_grad_(True)
    scale = torch.tensor([2.0 / (n - 1) for n in shape])
    expected = (coords * scale.view(1, ndim, *([1] * ndim)) - 1.0).movedim(1, -1).flip(-1)
    got = fields.voxel_to_grid_sample(coords, shape)
    assert torch.equal(got, expected) and got.stride() == expected.stride()
    upstream = torch.randn(got.shape)  # contiguous, as grid_sample's gradient w.r.t. the grid
    (grad_got,) = torch.autograd.grad(got, coords, upstream)
    (grad_expected,) = torch.autograd.grad(expected, coords, upstream)
    assert torch.equal(grad_got, grad_expected) and grad_got.stride() == grad_expected.stride()
    coords64 = _coords(shape, 2.0, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: fields.voxel_to_grid_sample(c, shape), (coords64,))


def _whole(x, passes, adjoint):
    """The whole-tensor computation (no slabs)."""
    return filters._box_chain(x, passes, None, adjoint)


def _slab_budget(shape, passes):
    """A slab budget of ``4 * passes`` rows (the thinnest slab used)."""
    per_row = shape[0] * shape[1] * (shape[3] * (shape[4] if len(shape) == 5 else 1))
    return 4 * passes * per_row


@pytest.mark.parametrize("shape", [(1, 3, 40, 6, 7), (2, 2, 37, 9), (1, 3, 30, 5, 4)])
@pytest.mark.parametrize("passes", [1, 2, 3])
def test_box_smoothing_by_slabs_equals_the_whole_tensor_bit_for_bit(monkeypatch, shape, passes):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    expected, expected_adjoint = _whole(x, passes, False), _whole(x, passes, True)
    monkeypatch.setattr(filters, "_BOX_SLAB_ELEMENTS", _slab_budget(shape, passes))
    calls = []
    chain = filters._box_chain
    monkeypatch.setattr(filters, "_box_chain", lambda *args: calls.append(1) or chain(*args))
    assert torch.equal(filters.box_smooth(x, passes), expected)
    assert torch.equal(filters.box_smooth_adjoint(x, passes), expected_adjoint)
    assert len(calls) >= 4  # two slabs or more each way


@pytest.mark.parametrize("shape", [(1, 3, 21, 4, 5), (1, 2, 19, 6)])
def test_box_smoothing_by_slabs_keeps_its_adjoint_the_transpose(monkeypatch, shape):
    from dirio.transforms.dense import smooth_parameters

    monkeypatch.setattr(filters, "_BOX_SLAB_ELEMENTS", _slab_budget(shape, 2))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: smooth_parameters(t, 2), (x,))
    a, b = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close((filters.box_smooth(a, 2) * b).sum(), (a * filters.box_smooth_adjoint(b, 2)).sum())


def test_box_smoothing_of_zero_passes_returns_the_input():
    x = torch.randn(1, 3, 4, 5, 6)
    assert filters.box_smooth(x, 0) is x and filters.box_smooth_adjoint(x, 0) is x


def _convolution_filter(image, kernels, padding):
    """The definition: one single-channel ``conv3d``/``conv2d`` per axis after padding."""
    ndim = image.dim() - 2
    out = image.reshape(-1, 1, *image.shape[2:])
    conv = F.conv3d if ndim == 3 else F.conv2d
    for axis, kernel in enumerate(kernels):
        if kernel is None:
            continue
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = kernel.numel()
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = kernel.numel() // 2
        out = F.pad(out, pad) if padding == "zeros" else F.pad(out, pad, mode=padding)
        out = conv(out, kernel.view(shape))
    return out.reshape(image.shape)


@pytest.mark.parametrize("shape", [(2, 3, 17, 19, 21), (1, 2, 30, 31), (1, 1, 64, 48, 40)])
@pytest.mark.parametrize("padding", ["replicate", "reflect", "zeros"])
def test_separable_filter_equals_one_convolution_per_axis(shape, padding):
    image = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    ndim = len(shape) - 2
    kernels = [filters.gaussian_kernel_1d(0.8 + 0.6 * axis) if axis != 1 else None for axis in range(ndim)]
    torch.testing.assert_close(filters.separable_filter(image, kernels, padding),
                               _convolution_filter(image, kernels, padding), rtol=1e-6, atol=1e-6)


def test_separable_filter_passes_float64_gradcheck():
    image = torch.rand(1, 2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    kernels = [filters.gaussian_kernel_1d(1.0, dtype=torch.float64)] * 3
    assert torch.autograd.gradcheck(lambda x: filters.separable_filter(x, kernels), (image,))
