"""LapIRN: reproduces upstream's output with the upstream weights; padding, levels, units, loading errors.

The reproduction tests read ``../shared/data`` (LapIRN weights, upstream's reference samples and the
OASIS demo pair) and skip when it is absent; the other tests use tiny random-weight networks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dirio.core.fields import warp
from dirio.errors import DirioError
from dirio.evaluation.overlap import dice_per_label
from dirio.transforms.networks import build_network
from dirio.transforms.networks.layout import channels_last_3d
from dirio.io.images import load_image
from dirio.transforms.networks.lapirn import (
    LapIRN,
    from_network_units,
    from_upstream_state_dict,
    min_max_normalise,
    to_network_units,
    upsample_field,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = DATA / "lapirn-weights"
PAIR = DATA / "lapirn-oasis-brain"
SAMPLE_TOLERANCE = 1e-3  # voxels
DICE_TOLERANCE = 1e-4


def _require_data() -> None:
    if not (WEIGHTS / "reference" / "summary.json").is_file() or not PAIR.is_dir():
        pytest.skip(f"LapIRN weights / OASIS pair not found under {DATA} (../shared/data beside the repository)")


@pytest.fixture(scope="module")
def oasis_pair():
    _require_data()
    fixed = load_image(PAIR / "image_A_160x192x144.nii.gz").to_tensor()
    moving = load_image(PAIR / "image_B_160x192x144.nii.gz").to_tensor()
    fixed_labels = np.asarray(load_image(PAIR / "image_A_160x192x144_seg.nii.gz", labels=True).data)
    moving_labels = np.asarray(load_image(PAIR / "image_B_160x192x144_seg.nii.gz", labels=True).data)
    return fixed, moving, fixed_labels, moving_labels


# --- reproduction of upstream (real data, one full-size forward per variant) ---------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("variant", ["disp", "diff"])
def test_upstream_weights_reproduce_upstream_field_and_dice(variant, layout, oasis_pair):
    """With upstream's weights, dirio's LapIRN gives upstream's field (to 1e-3 voxels at 2000 listed
    voxels, in dirio's units and axis order) and upstream's Dice of the warped labels (to 1e-4;
    labels warped with nearest neighbour and border padding, as upstream does), in both weight
    layouts (channels-last is what registrations on the CPU use)."""
    fixed, moving, fixed_labels, moving_labels = oasis_pair
    model = build_network(WEIGHTS / f"LapIRN_{variant}_fea7.pth", architecture=f"lapirn-{variant}")
    if layout == "channels-last":
        channels_last_3d(model)
    with torch.no_grad():
        disp = model(fixed, moving)
    assert disp.shape == (1, 3, 160, 192, 144) and disp.dtype == torch.float32

    reference = np.loadtxt(WEIGHTS / "reference" / f"{variant}_A_from_B_samples.csv", delimiter=",", skiprows=1)
    ijk = reference[:, :3].astype(int)
    got = disp[0].numpy()[:, ijk[:, 0], ijk[:, 1], ijk[:, 2]].T
    assert np.abs(got - reference[:, 3:]).max() < SAMPLE_TOLERANCE

    warped = warp(torch.from_numpy(moving_labels.astype(np.int64))[None, None], disp, mode="nearest")
    dice = dice_per_label(fixed_labels, warped[0, 0].numpy(), (1, 2), moving_labels=moving_labels)
    expected = json.loads((WEIGHTS / "reference" / "summary.json").read_text())[variant]["dice_after"]
    for label in (1, 2):
        assert dice[label] == pytest.approx(expected[str(label)], abs=DICE_TOLERANCE)


def test_upstream_file_without_variant_hint_is_a_one_line_error():
    """An upstream file does not say whether it predicts displacements or velocities: dirio asks."""
    _require_data()
    with pytest.raises(DirioError) as info:
        build_network(WEIGHTS / "LapIRN_disp_fea7.pth")
    message = str(info.value)
    assert "\n" not in message and "LapIRN_disp_fea7.pth" in message and "lapirn-disp" in message


# --- tiny random-weight networks ----------------------------------------------------------------


def _tiny(diffeomorphic: bool = False, seed: int = 0) -> LapIRN:
    torch.manual_seed(seed)
    model = LapIRN(diffeomorphic=diffeomorphic, start_channel=1)
    # Random weights large enough that the field is not ~0, so that comparisons mean something.
    with torch.no_grad():
        for level in model.levels:
            level.head[2].weight.mul_(20.0)
    return model.eval()


def _smooth_pair(shape, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(2, 1, *shape, generator=generator)
    smooth = F.avg_pool3d(noise, 3, stride=1, padding=1, count_include_pad=False)
    return min_max_normalise(smooth[:1]), min_max_normalise(smooth[1:])


def _upstream_layout(state_dict: dict) -> dict:
    """dirio keys -> upstream keys (the inverse of the documented key map), for building test files."""
    prefixes = {"levels.0.": "model_lvl2.model_lvl1.", "levels.1.": "model_lvl2.", "levels.2.": ""}
    layers = {"encoder": "input_encoder_lvl1", "down": "down_conv", "residual": "resblock_group_lvl1", "up": "up", "head": "output_lvl1"}
    out = {}
    for key, value in state_dict.items():
        prefix = key[:9]
        layer, _, rest = key[9:].partition(".")
        out[f"{prefixes[prefix]}{layers[layer]}.{rest}"] = value
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("diffeomorphic", [False, True])
def test_non_multiple_size_is_padded_and_cropped_like_a_manual_padding(diffeomorphic):
    """A 13x10x9 input gives the field of the same input zero-padded by hand to 16x16x16 (padding
    split before/after, odd voxel after), cropped back: the image is padded, never resized."""
    model = _tiny(diffeomorphic)
    fixed, moving = _smooth_pair((13, 10, 9))
    with torch.no_grad():
        disp = model(fixed, moving)
        pads = (3, 4, 3, 3, 1, 2)  # F.pad order: last axis first
        padded = model(F.pad(fixed, pads), F.pad(moving, pads))
    assert disp.shape == (1, 3, 13, 10, 9)
    assert padded.shape == (1, 3, 16, 16, 16)
    assert disp.abs().max() > 0.05
    torch.testing.assert_close(disp, padded[:, :, 1:14, 3:13, 3:12], rtol=0, atol=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_levels_run_one_at_a_time_and_are_upsampled_to_the_input_grid():
    """``levels=k`` runs levels 1..k; each level's field lives on its own grid (1/4, 1/2, 1 of the
    padded input) and ``forward`` returns the last one upsampled to the input grid."""
    model = _tiny()
    fixed, moving = _smooth_pair((16, 24, 8))
    with torch.no_grad():
        outputs = model.forward_levels(fixed, moving, levels=3)
        assert [o.level for o in outputs] == [1, 2, 3]
        assert [tuple(o.displacement.shape[2:]) for o in outputs] == [(4, 6, 2), (8, 12, 4), (16, 24, 8)]
        assert all(o.velocity is None for o in outputs)
        coarse = model(fixed, moving, levels=1)
        torch.testing.assert_close(coarse, upsample_field(upsample_field(outputs[0].displacement)))
        torch.testing.assert_close(model(fixed, moving, levels=2), model.to_input_grid(outputs[1]))
        torch.testing.assert_close(model(fixed, moving), outputs[2].displacement)
    with pytest.raises(ValueError, match="levels are 1"):
        model(fixed, moving, levels=4)


@pytest.mark.usefixtures("one_thread")
def test_frozen_levels_get_no_gradient_and_level_parameters_partition_the_network():
    """freeze_levels sets requires_grad False on those levels only; the levels' parameters are
    disjoint and cover the network; no parameter is a spatial field."""
    model = _tiny()
    per_level = [model.level_parameters(k) for k in (1, 2, 3)]
    ids = [id(p) for params in per_level for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert model.spatial_parameters() == []

    model.freeze_levels(1, 2)
    assert all(not p.requires_grad for p in per_level[0] + per_level[1])
    assert all(p.requires_grad for p in per_level[2])
    fixed, moving = _smooth_pair((8, 8, 8))
    model(fixed, moving).square().mean().backward()
    assert all(p.grad is None for p in per_level[0] + per_level[1])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in per_level[2])

    model.unfreeze_levels()
    assert all(p.requires_grad for p in model.parameters())


def test_network_units_are_normalised_and_reversed():
    """A displacement of 1 voxel along axis i of a grid of 5 voxels is 2 / (5 - 1) = 0.5 in the
    network's last component, and the conversion round-trips."""
    disp = torch.zeros(1, 3, 5, 9, 3)
    disp[:, 0] = 1.0
    net = to_network_units(disp)
    torch.testing.assert_close(net[:, 2], torch.full((1, 5, 9, 3), 0.5))
    assert net[:, :2].abs().max() == 0
    random = torch.randn(2, 3, 5, 9, 3)
    torch.testing.assert_close(from_network_units(to_network_units(random)), random)


def test_upsampling_keeps_a_constant_field_constant_in_network_units():
    """Doubling the grid keeps a constant normalised field constant, i.e. a voxel value ``c`` on
    ``n`` voxels becomes ``c (2n - 1) / (n - 1)``."""
    disp = torch.ones(1, 3, 4, 5, 6)
    up = upsample_field(disp)
    assert up.shape == (1, 3, 8, 10, 12)
    for d, n in enumerate((4, 5, 6)):
        torch.testing.assert_close(up[:, d], torch.full_like(up[:, d], (2 * n - 1) / (n - 1)))


def test_upstream_key_map_round_trips_and_reads_the_width():
    """from_upstream_state_dict renames upstream's nested keys to dirio's and reads start_channel."""
    model = LapIRN(start_channel=2)
    renamed, settings = from_upstream_state_dict(_upstream_layout(model.state_dict()))
    assert list(renamed) == list(model.state_dict())
    assert settings == {"start_channel": 2}


def test_wrong_weights_are_a_one_line_error_naming_the_keys(tmp_path):
    """An upstream-layout file with a missing and an unexpected key, or of another width, is one
    DirioError line naming the file and the keys."""
    layout = _upstream_layout(LapIRN(start_channel=1).state_dict())
    layout.pop("model_lvl2.down_conv.weight")
    layout["output_lvl1.9.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(layout, path)
    with pytest.raises(DirioError) as info:
        build_network(path, architecture="lapirn-disp")
    message = str(info.value)
    assert "\n" not in message and "broken.pth" in message
    assert "missing keys levels.1.down.weight" in message and "unexpected keys levels.2.head.9.weight" in message

    wide = _upstream_layout(LapIRN(start_channel=2).state_dict())
    wide["input_encoder_lvl1.0.weight"] = torch.zeros(4, 5, 3, 3, 3)  # claims start_channel=1
    torch.save(wide, path)
    with pytest.raises(DirioError, match=r"shape mismatch levels\.0\.encoder\.0\.weight .* \(\+\d+ more\)") as info:
        build_network(path, architecture="lapirn-disp")
    assert "\n" not in str(info.value)


def test_diffeomorphic_levels_carry_their_velocity():
    """The diffeomorphic variant reports each level's velocity, whose exponential is the field."""
    from dirio.core.fields import integrate_velocity

    model = _tiny(diffeomorphic=True)
    fixed, moving = _smooth_pair((8, 8, 8))
    with torch.no_grad():
        outputs = model.forward_levels(fixed, moving)
    for output in outputs:
        assert output.velocity is not None
        torch.testing.assert_close(output.displacement, integrate_velocity(output.velocity, model.integration_steps))
    assert model.architecture == "lapirn-diff" and model.settings["integration_steps"] == 7
