"""The named presets: sets of overrides (flat option keys, see :func:`dirio.config.settings.make_settings`)
over the defaults. Each documents where its values come from."""

from __future__ import annotations

from typing import Any

_CONVEX_ADAM: dict[str, Any] = {
    # ConvexAdam (Siebert, Hansen & Heinrich, Learn2Reg 2021), faithful to the defaults of its
    # reference code (convexAdam 0.2.0, convex_adam_MIND.convex_adam_pt). Its field is reproduced
    # voxel by voxel (benchmarks/convexadam_reference.py, tests/test_convexadam_agreement.py): within
    # 0.035 voxels on the lung pair and 0.096 on a brain pair (the reference differs from itself by
    # 0.015-0.019 when its float operations are reordered). Its two sampling quirks included: it reads
    # the moving features at y + u(y) n / (n - 1) (an align_corners=False grid with a displacement
    # normalised by (n - 1) / 2) and as 0 beyond the grid ("feature_sampling": "convexadam"); without
    # them the field is ~1/n longer (0.12 / 0.18 voxels from the reference's).
    "feature_sampling": "convexadam",
    # Adam's step depends on the loss's scale through its eps (1e-8): the reference's loss is 12x
    # dirio's (the sum of the 12 MIND channels' SSD where dirio takes their mean; its regulariser
    # likewise), so eps / 12 here takes the reference's steps exactly. Where the cost is flat (a
    # brain's background) the gradients are near eps: with eps 1e-8 the brain field was 0.41 voxels
    # from the reference's, with 1e-8 / 12 0.18 (0.096 with the quirks).
    "optimizer_options": {"eps": 1e-8 / 12},
    # MIND-SSC is invariant to affine intensity changes: min-max scaling keeps the reference's
    # descriptors exactly (percentile clipping changed them where it clipped).
    "normalise": "minmax",
    # Masks as the reference uses them: each image outside its mask's interior takes the nearest
    # interior intensity of the half-resolution grid, upsampled (dirio.core.mask_fill, the reference's
    # fill), and the losses count everywhere.
    "mask_use": "fill",
    # mind_r = 1, mind_d = 2, computed on the full-resolution images for both stages; the Adam
    # stage averages them over 2x2x2 blocks (its avg_pool3d).
    "similarity": "mind",
    "similarity_options": {"radius": 1, "dilation": 2},
    "features_from": "pooled",
    # ConvexAdam minimises 12 * mean MIND SSD + lambda * sum_axes mean_{voxels, components}(du^2)
    # with lambda = 1.25 on its smoothed field; per unit of dirio's MIND loss (the channel mean) and
    # diffusion (summed over components) that is lambda / 12 / 3 = 0.035.
    "regularizers": {"diffusion": 1.25 / 36},
    # Discrete step: grid_sp = 6, disp_hw = 4, its six coupling weights, inverse consistency
    # (ic, 15 iterations), descriptors at full resolution, its border conventions (see ConvexConfig's
    # defaults; the step's field matches the reference's to 0.01 voxels on the lung pair).
    "init": "convex",
    "convex": {"feature_factor": 1, "mind_dilation": 2, "borders": "convexadam"},
    # Adam refinement of a half-resolution field (grid_sp_adam = 2), 80 iterations at lr 1,
    # constant rate, three passes of a 3-voxel box over the parameters with zero padding (its three
    # avg_pool3d(padding=1)), the diffusion on that smoothed field, the half grid's
    # align_corners=False geometry (its F.interpolate between the grids).
    "levels": (2,), "iterations": (80,), "grid_spacing": 1.0, "lr": 1.0,
    "schedule": "constant", "smoothing": 3, "smoothing_border": "zeros", "regularize": "smoothed",
    "grid_alignment": "centres",
}

# Each preset documents where its defaults come from. Values were chosen on synthetic warps of
# the voxelmorph brain and on brain-vs-mirrored-brain pairs (not on any evaluation pair); see
# docs/concepts/presets.md and benchmarks/RESULTS.md.
PRESETS: dict[str, dict[str, Any]] = {
    "brain-mri": {
        # Skull-stripped T1 in [0, 1]: robust percentile scaling only removes outliers.
        "normalise": "percentile",
        # LNCC is the standard mono-modal brain similarity. Window 5 at the quarter- and half-
        # resolution levels (20 and 10 mm), 9 at full resolution (VoxelMorph's 9^3; dirio.losses.by_level).
        # Chosen on the brain validation sets (issue 19, RESULTS.md; with 40/16/10 iterations), on 10
        # pairs against the former window 5 everywhere (60/24/8): real tissue Dice 0.818 vs 0.809, known
        # warps 0.961 vs 0.953 Dice30 (endpoint error 0.216 vs 0.261 voxels), fine warps 0.913 vs 0.906,
        # at most 0.006 % det(J) <= 0 (was 0.020 %); random-contrast images 0.692 vs 0.714 (dipy SyN
        # 0.652). Window 9 at every level lost the random-contrast images (0.610: a 36 mm window at
        # quarter resolution mixes many labels of random intensities); 7 at every level gave 0.664.
        "similarity": "lncc",
        "similarity_options": {"window": (5, 5, 9)},
        # Greedy composition (dirio.transforms.composed): the optimiser's increment is composed into
        # the field every 3 steps, so the field deforms as far as a symmetric-normalisation tool's
        # without folding; the diffusion regularizer acts on the total field. Chosen on the brain
        # validation sets of benchmarks/brain_validation.py (4 real inter-subject pairs scored on
        # tissue classes, 2 fine-scale known warps with another intensity profile, 2 label maps turned
        # into images of random contrast; benchmarks/RESULTS.md): the additive field of the former
        # preset (diffusion 0.3, smoothing 3) reached tissue Dice 0.745 on the real pairs against
        # dipy SyN's 0.802. Composing with diffusion 0.2 / 0.15 / 0.1 / 0.07 gave 0.777 / 0.789 /
        # 0.800 / 0.807 (lower weights better on each of the 4 pairs), while the known-warp sets lose
        # as the weight drops. Composing every 1, 2 or 3 steps and 80/30 or 60/24 coarse iterations
        # gave the same accuracy (0.805-0.807); every 3 steps and 60/24 is the cheapest. Without
        # composition at the full-resolution level the field folds 0.5 % of the voxels.
        # Final candidates on all 8 pairs (real tissue Dice; fine; random-contrast Dice30):
        # smoothing 3 + diffusion 0.07: 0.804, 0.906, 0.704; smoothing 2 + 0.07: 0.816, 0.902, 0.671;
        # smoothing 2 + 0.1 (this preset): 0.809, 0.906, 0.714, at most 0.020 % det(J) <= 0 and the
        # cheapest; dipy SyN 0.802, 0.901, 0.652; ANTs SyN 0.706, 0.880, 0.430.
        "regularizers": {"diffusion": 0.1},
        # The two gradients combined by projection (the gradient-projection IO paper's PCGrad on the
        # dense field; dirio.optim.combine): when the diffusion gradient opposes the similarity's, its
        # conflicting component is removed, so smoothness never undoes image matching. Chosen on the
        # three choice pairs (c2fA->vxm, known-s2, fine-s1) among PCGrad's projections (random: known
        # 0.962 / fine 0.936 but real 0.808; always the regularizer: real 0.827) and against the sum;
        # on all 10 validation pairs (RESULTS.md, issue 19, sixth session) the regularizer's
        # projection against the sum: real tissue Dice 0.824 vs 0.818 (higher on each of the 4
        # pairs, 3 held out), known 0.961 vs 0.961, fine 0.912 vs 0.913, random-contrast 0.674 vs
        # 0.692 (dipy SyN 0.652), at most 0.011 % det(J) <= 0, for about 6 % more time (a second
        # backward pass).
        "combine": "pcgrad",
        "combine_options": {"project": "regularizer"},
        "compose_every": 3,
        # Quarter, half, then full resolution: a short full-resolution level gained +0.03 tissue Dice
        # on the real pairs while the quarter- and half-resolution levels had converged. More
        # full-resolution iterations help every set (8 / 10 / 12 with the windows above: real 0.817 /
        # 0.818 / 0.820 with 60/24 or 40/16 coarse iterations, known 0.959 / 0.961 / 0.963) and
        # 40/16 coarse iterations cost nothing against 60/24; 10 keeps the whole command at about
        # 26 s on a 2-core CPU (benchmarks/whole_command.py; the former preset 22.5 s; about 22 s since the
        # command keeps freed memory, RESULTS.md issue 19 fifth session). Two passes of
        # the 3-voxel parameter smoothing. lr 0.5 level voxels per step with a cosine decay per level:
        # lr 1.0 gave rough fields (see RESULTS.md).
        "levels": (4, 2, 1), "iterations": (40, 16, 10), "lr": 0.5, "schedule": "cosine", "smoothing": 2,
        # The final field smoothed by a Gaussian of 1.5 voxels when that raises the full-resolution LNCC
        # loss by at most 0.02 (dirio.methods.final_smoothing): the images then do not need the field's
        # finest detail. Chosen on the three choice pairs (c2fA->vxm, known-s2, fine-s1; RESULTS.md,
        # issue 19, eighth session): the probe's rise was 0.044 on the real pair and 0.008 / 0.012 on
        # the warps (threshold between them), and sigma 1.5 the best of 1.0 / 1.5 / 2.0 on the two
        # warps together. Held out: the three other real pairs rose 0.039-0.043 (kept as they are), the
        # known, fine and random-contrast warps 0.008-0.016 (smoothed): known 0.961 -> 0.968 Dice30,
        # fine 0.912 -> 0.928, random contrast 0.674 -> 0.689, the real pairs unchanged at 0.824.
        "final_smoothing": {"mode": "auto"},
    },
    "lung-ct": {
        # Lung CT in HU: air is -1000; the elastix pair has padding down to -2048 outside the scan.
        "normalise": "clip",
        "clip_range": (-1000.0, 1500.0),
        # Automatic lung masks when none are given (dirio.methods.lung_mask; benchmarks/lung_auto_mask.py):
        # as good as the provided masks on every lung validation (elastix pair, 10 landmarks, both
        # halves, index and world set-ups; known warps of the baseline, seeds 1 and 2) and better than
        # no mask on each: TRE 2.07 vs 2.56 mm (index), 2.32 vs 2.90 mm (world), endpoint error 1.25 vs
        # 1.74 and 0.96 vs 1.35 mm. The mask has no parameter tuned on landmarks.
        "auto_mask": "lungs",
        # The continuous-optimisation paper's method started from ConvexAdam's initialisation (issue
        # 20): the faithful discrete + coupled convex step of `convex-adam` (ConvexConfig's defaults:
        # MIND-SSC radius 1, dilation 2 on the full-resolution images, 6-voxel cells, radius 4,
        # inverse consistency) after the affine stage, then Adam with the constant -> cosine ->
        # linear schedule on MIND-SSC descriptors of the full-resolution images (radius 1, dilation 2,
        # as ConvexAdam), averaged down to each level ("pooled"). On the lung validation sets
        # (benchmarks/lung_validation.py, RESULTS.md issue 20) these full-resolution descriptors took
        # the breathing-warp endpoint error from 0.46 to 0.33 mm and the keypoint TRE from 0.33 to
        # 0.28 mm against the former level descriptors (dilation 1 of the level), and the 10 landmarks
        # from 2.06 to 2.02 mm (index set-up; world 2.31 -> 2.32), with no folding; the reference
        # ConvexAdam: 0.65, 0.46, 2.09, 3.55 mm. The convex initialisation changed none of these sets
        # (within 0.01 mm) and costs ~1 s: it is kept for motion beyond the pyramid's reach (the
        # method the paper starts from).
        "init": "convex",
        "similarity": "mind",
        "similarity_options": {"radius": 1, "dilation": 2},
        "features_from": "pooled",
        # Diffusion weight 0.5, unchanged: with the full-resolution descriptors, 0.1 / 0.2 / 0.3 / 0.5
        # gave 0.38 / 0.34 / 0.34 / 0.33 mm on the breathing warps and 2.15 / 2.10 / 2.11 / 2.02 mm
        # (index) and 2.41 / 2.35 / 2.39 / 2.32 mm (world) on the 10 landmarks; 0.5 was picked on 5
        # landmarks in 86 % (index) and 65 % (world) of the 252 leave-five-out splits.
        "regularizers": {"diffusion": 0.5},
        # The continuous-optimisation paper: Adam with the constant -> cosine -> linear schedule.
        "levels": (4, 2), "iterations": (100, 60), "lr": 1.0, "schedule": "piecewise",
        # Scans of one patient taken at different times are shifted (35 mm table offset on the
        # elastix pair when resampled through the headers) and breathing-scaled (3-7 %): an affine
        # stage first, 100 quarter- then 20 half-resolution iterations (~4 s on the 2-core CPU).
        # With the former dense stage (no convex step, level descriptors), a quarter-resolution-only
        # affine (150 iterations) instead of 150 + 30 raised the final TRE from 2.07 to 2.10 mm
        # (index set-up) and 2.31 to 2.48 mm (world set-up). With the convex step and the
        # full-resolution descriptors (issue 20): 150 + 30 gave 0.33 mm (breathing warps), 2.02 mm
        # (index), 2.32 mm (world); 100 + 20 gave 0.33, 2.02, 2.33 mm and keeps the whole command
        # within 20 s; 150 quarter-only 0.34, 2.03, 2.35 mm.
        "affine": "affine",
        "affine_options": {"levels": (4, 2), "iterations": (100, 20)},
    },
    "convex-adam": _CONVEX_ADAM,
    "convex-adam-fast": {
        # convex-adam with two speed shortcuts, each measured against the faithful preset in
        # benchmarks/RESULTS.md (issue 12, lung validation): the discrete step's descriptors are
        # computed on 2x2x2 block averages (dilation 1 there ~ 2 at full resolution; 8x fewer
        # voxels), and the Adam stage runs 60 quarter-resolution iterations then 15
        # half-resolution ones on features of each level's own images, instead of 80
        # half-resolution iterations on full-resolution features. A half-resolution iteration of
        # the 160x192x224 brain costs ~0.35 s on the 2-core development CPU, a quarter-resolution
        # one ~0.04 s.
        **_CONVEX_ADAM,
        # measured with the masks restricting the losses (its numbers in benchmarks/RESULTS.md)
        "mask_use": "restrict",
        "features_from": "level",
        # dirio's own conventions, with which it was measured: with the reference's (those of
        # convex-adam since issue 20) it was worse on every lung validation set (breathing warps
        # 1.10 vs 0.95 mm, keypoints 0.93 vs 0.85, 10 landmarks index 2.50 vs 2.40, world 3.77 vs
        # 2.69 with 1.37 % det <= 0; benchmarks/RESULTS.md, issue 20).
        "normalise": "percentile",
        "smoothing_border": "inside", "regularize": "parameters", "grid_alignment": "corners",
        "feature_sampling": "exact", "optimizer_options": {},
        "convex": {"feature_factor": 2, "mind_dilation": 1, "borders": "replicate"},
        "levels": (4, 2), "iterations": (60, 15),
    },
    "continuous": {
        # Vujovic et al., "continuous optimisation for large displacements": ConvexAdam's similarity
        # and regularizer (as the convex-adam preset), no discrete step, Adam on a half-resolution
        # field for 270 steps with the constant -> cosine -> linear schedule (phases end at steps
        # 70 and 180; see dirio.optim.schedules.Piecewise) and a large initial learning rate.
        "normalise": "percentile",
        "similarity": "mind",
        "similarity_options": {"radius": 1, "dilation": 2},
        "regularizers": {"diffusion": 1.25 / 36},
        # The paper gives the schedule's shape but not its initial value in the text; it reports
        # ConvexAdam's rate 1 and a "very high" constant rate 15 as the two ends. On the elastix
        # lung pair (index set-up, masks) initial rates 2 and 5 both gave TRE 2.44 mm, 10 diverged
        # (12.2 mm, 1 % folding): 5 is the largest tested rate that stays stable there.
        "levels": (2,), "iterations": (270,), "grid_spacing": 1.0, "lr": 5.0, "schedule": "piecewise",
        "smoothing": 3,
    },
}
