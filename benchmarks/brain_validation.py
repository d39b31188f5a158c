"""Benchmark: dirio brain variants against ANTs SyN, dipy SyN, greedy and FireANTs on four brain validation sets.

Every method registers the same pairs (moving -> fixed, all on the 160x192x224 voxelmorph grid) and
every field is scored by the same dirio code (``dirio.evaluation``): peers' fields are converted to
dirio's convention first (``(*S, 3)`` voxels of the fixed grid, ``warped(x) = moving(x + u(x))``).

Sets:

* ``fine``: the voxelmorph scan; fixed = scan warped by a known field = coarse component (Gaussian-
  smoothed noise, sigma 12 voxels, largest component 6 voxels) + fine component (sigma 3 voxels,
  largest 2 voxels); moving = scan with another intensity profile (gamma 0.7 / piecewise-linear
  tissue remap / gamma 1.4 by seed), a smooth multiplicative bias field (x0.8..1.2) and N(0, 0.02)
  noise; fixed has N(0, 0.01) noise. Scored: Dice over the 30 VoxelMorph labels, endpoint error
  (EPE, voxels) inside the fixed brain (warped aseg > 0).
* ``real``: inter-subject pairs among the five real brains on the voxelmorph grid (affinely aligned
  by their providers; READMEs of the shared data). Scored on tissue classes (CSF/GM/WM from each
  image's own intensities by a 3-class 1-D k-means inside its brain mask, see ``tissue_classes``):
  mean Dice of the 3 classes; global NCC and local NCC (window 9, dirio's ``lncc_map``) inside the
  fixed brain mask; the 13-class Dice for the pair that has 13-class maps on both sides.
* ``synth``: SynthSeg-like images from the voxelmorph aseg: each label gets a random mean
  intensity, within-label noise N(0, 0.03) and a Gaussian blur (sigma 0.8 voxel); fixed = image
  of the aseg warped by a known field (as in ``fine``, nearest neighbour), moving = image of the
  original aseg with *other* random intensities, so the true answer is the known field. Scored:
  Dice (30 labels), EPE.
* ``known``: the ``synth2``-like known warps of ``benchmarks/brain_synthetic.py``: fixed = the voxelmorph
  scan warped by one smooth random field (sigma 14 voxels, largest component 8 voxels), moving = the scan,
  both with N(0, 0.01) noise (``dirio.testing.synthetic.warped_pair``; same contrast). Scored: Dice
  (30 labels), EPE.

Every row also has % det(J) <= 0, SDlogJ (Learn2Reg) and NDV %, and the method's wall and CPU
seconds (getrusage, self + children; peers: inside their worker). dirio variants run in this process
through ``dirio.api.register`` with settings parsed from ``dirio register`` flags; peers run in a
separate interpreter (``--peer-python`` or ``$DIRIO_PEER_PYTHON``) through
``benchmarks/brain_peers_worker.py``. Fields are cached in ``<out>/fields`` keyed by pair, method
and a hash of the inputs (and dirio flags), so reruns only compute what changed.

    python benchmarks/brain_validation.py [--sets fine,real,synth,known] [--peer-python /tmp/antsenv/bin/python]
        [--peer-python greedy=/tmp/greedyenv/bin/python] [--variant NAME="dirio register flags" ...]
        [--peers ants,dipy,greedy,fireants] [--quick]

``--peer-python`` is one interpreter for every peer, or ``PEER=PYTHON`` for one peer (repeatable).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

import _common as C
from dirio.api import apply_field, register
from dirio.apps.cli import build_parser, settings_from_args
from dirio.evaluation.evaluate import evaluate_field
from dirio.evaluation.jacobian import fraction_nonpositive_jacobian, sdlogj_l2r
from dirio.io.images import load_image, save_image
from dirio.losses.lncc import lncc_map
from dirio.testing.synthetic import endpoint_error, smooth_random_field, warped_pair
from oasis_pair import ncc

NAME = "brain_validation"
WORKER = Path(__file__).with_name("brain_peers_worker.py")
DEFAULT_VARIANTS = {
    "brain-mri": "--preset brain-mri",
    "former": "--preset brain-mri --compose-every 0 --weight 0.3 --smoothing 3 --iterations 80,30,8",
}
PEERS = ("ants", "dipy", "greedy", "fireants")
PEER_MODULES = {"ants": "ants", "dipy": "dipy", "greedy": "picsl_greedy", "fireants": "fireants"}
# The `known` set (the synth2 pairs of benchmarks/brain_synthetic.py): sigma, largest component (voxels), noise.
KNOWN = (14.0, 8.0, 0.01)
# Known warps of the `fine` and `synth` sets: (sigma, largest component) in voxels per component.
COARSE = (12.0, 6.0)
FINE = (3.0, 2.0)
REAL = {  # name -> file under the shared data folder (all 160x192x224, one grid voxel for voxel)
    "vxm": "voxelmorph-brain/test_scan_vol.nii.gz",
    "c2fA": "c2fvit-oasis-brain/on-voxelmorph-grid/image_A.nii.gz",
    "c2fB": "c2fvit-oasis-brain/on-voxelmorph-grid/image_B.nii.gz",
    "lapA": "conditional-lapirn-oasis-brain/image_A_fullsize.nii.gz",
    "lapB": "conditional-lapirn-oasis-brain/image_B_fullsize.nii.gz",
}
SEG13 = {"vxm": "c2fvit-oasis-brain/on-voxelmorph-grid/voxelmorph_seg13.nii.gz",
         "c2fA": "c2fvit-oasis-brain/on-voxelmorph-grid/image_A_seg13.nii.gz"}
REAL_PAIRS = (("c2fA", "vxm"), ("lapA", "c2fB"), ("vxm", "lapB"), ("lapB", "c2fA"))  # (moving, fixed)


@dataclass
class Pair:
    """One registration problem. Images ``S`` float32; ``labels``: name -> (fixed map, moving map,
    ids); ``true_disp`` ``(*S, 3)`` voxels or None; ``mask`` ``S`` bool, the fixed brain."""

    name: str
    set: str
    fixed: np.ndarray
    moving: np.ndarray
    mask: np.ndarray
    labels: dict = field(default_factory=dict)
    true_disp: np.ndarray | None = None
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- generation

def known_field(shape, seed: int) -> np.ndarray:
    """Coarse + fine smooth random displacement ``(*S, 3)`` float32, voxels (see ``COARSE``, ``FINE``)."""
    coarse = smooth_random_field(shape, sigma=COARSE[0], max_displacement=COARSE[1], seed=seed)
    fine = smooth_random_field(shape, sigma=FINE[0], max_displacement=FINE[1], seed=seed + 1000)
    return np.ascontiguousarray((coarse + fine)[0].numpy().transpose(1, 2, 3, 0))


def intensity_profile(image: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """A monotone non-linear remap of ``[0, 1]`` intensities chosen by seed (1: gamma 0.7,
    2: piecewise-linear tissue remap, 3: gamma 1.4, then repeating); returns (image, description)."""
    kind = (seed - 1) % 3
    clipped = np.clip(image, 0.0, 1.0)
    if kind == 0:
        return clipped ** 0.7, "gamma 0.7"
    if kind == 2:
        return clipped ** 1.4, "gamma 1.4"
    knots, values = (0.0, 0.25, 0.5, 0.75, 1.0), (0.0, 0.45, 0.55, 0.7, 1.0)
    return np.interp(clipped, knots, values).astype(np.float32), f"piecewise {knots}->{values}"


def fine_pair(image: np.ndarray, seg: np.ndarray, label_ids, seed: int) -> Pair:
    """The ``fine`` set's pair of one seed (see the module docstring)."""
    disp = known_field(image.shape, seed)
    rng = np.random.default_rng(seed)
    fixed = apply_field(image, disp) + rng.normal(0.0, 0.01, image.shape)
    fixed_labels = apply_field(seg, disp, labels=True)
    remapped, profile = intensity_profile(image, seed)
    bias = np.exp(smooth_random_field(image.shape, sigma=30.0, max_displacement=0.2, seed=seed + 2000)[0, 0].numpy())
    moving = remapped * bias + rng.normal(0.0, 0.02, image.shape)
    return Pair(f"fine-s{seed}", "fine", fixed.astype(np.float32), moving.astype(np.float32), fixed_labels > 0,
                {"aseg30": (fixed_labels, seg, label_ids)}, disp, {"profile": profile})


def label_image(labels: np.ndarray, seed: int) -> np.ndarray:
    """SynthSeg-like image of a label map: per-label mean ~ U(0.05, 1) (background 0), N(0, 0.03)
    within-label noise, Gaussian blur sigma 0.8 voxel. ``S`` integer -> ``S`` float32."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.05, 1.0, int(labels.max()) + 1)
    means[0] = 0.0
    image = means[labels] + rng.normal(0.0, 0.03, labels.shape) * (labels > 0)
    return gaussian_filter(image, 0.8).astype(np.float32)


def synth_pair(seg: np.ndarray, label_ids, seed: int) -> Pair:
    """The ``synth`` set's pair of one seed: fixed from the warped aseg, moving from the aseg."""
    disp = known_field(seg.shape, seed + 100)
    fixed_labels = apply_field(seg, disp, labels=True)
    fixed = label_image(fixed_labels, seed + 200)
    moving = label_image(seg, seed + 300)
    return Pair(f"synth-s{seed}", "synth", fixed, moving, fixed_labels > 0, {"aseg30": (fixed_labels, seg, label_ids)},
                disp)


def known_pair(image: np.ndarray, seg: np.ndarray, label_ids, seed: int) -> Pair:
    """The ``known`` set's pair of one seed: the scan warped by a smooth random field, same contrast."""
    made = warped_pair(image, seg, sigma=KNOWN[0], max_displacement=KNOWN[1], noise_std=KNOWN[2], seed=seed)
    return Pair(f"known-s{seed}", "known", made.fixed, made.moving, made.fixed_labels > 0,
                {"aseg30": (made.fixed_labels, made.moving_labels, label_ids)}, made.true_disp)


def tissue_classes(image: np.ndarray, iterations: int = 50) -> np.ndarray:
    """CSF/GM/WM (1/2/3, 0 outside) of a skull-stripped T1 by 3-class 1-D k-means (Lloyd) of the
    intensities inside its brain mask (image > 0), started at the 10/50/90th percentiles."""
    mask = image > 0
    values = image[mask].astype(np.float64)
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(iterations):
        assign = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        new = np.array([values[assign == k].mean() for k in range(3)])
        if np.allclose(new, centres):
            break
        centres = new
    out = np.zeros(image.shape, np.uint8)
    out[mask] = np.argmin(np.abs(values[:, None] - centres[None]), axis=1) + 1
    return out


def real_pair(moving_name: str, fixed_name: str) -> Pair:
    """A real inter-subject pair (raw intensities), with tissue classes and 13-class maps where both exist."""
    def read(path, labels=False):
        return load_image(C.require(C.DATA / path, NAME), labels=labels).data

    fixed, moving = read(REAL[fixed_name]).astype(np.float32), read(REAL[moving_name]).astype(np.float32)
    labels = {"tissue": (tissue_classes(fixed), tissue_classes(moving), [1, 2, 3])}
    if fixed_name in SEG13 and moving_name in SEG13:
        labels["seg13"] = (read(SEG13[fixed_name], True), read(SEG13[moving_name], True), list(range(1, 14)))
    return Pair(f"{moving_name}->{fixed_name}", "real", fixed, moving, fixed > 0, labels)


# ----------------------------------------------------------------------------- scoring

def score(pair: Pair, disp: np.ndarray) -> dict:
    """Every metric of one ``(*S, 3)`` voxel field on ``pair``, by dirio's evaluation code."""
    row = {}
    for key, (fixed_labels, moving_labels, ids) in pair.labels.items():
        scored = evaluate_field(disp, fixed_labels=fixed_labels, moving_labels=moving_labels, labels=ids,
                                regularity=False, hd95=False)
        row[f"dice_{key}"] = scored["dice_mean"]
    regularity = evaluate_field(disp, hd95=False)
    row.update({k: regularity[k] for k in ("sdlogj_l2r", "percent_nonpositive_jacobian", "ndv_percent")})
    if pair.true_disp is not None:
        row["epe"] = endpoint_error(disp, pair.true_disp, pair.mask)
    if pair.set == "real":
        warped = apply_field(pair.moving, disp)
        row["ncc"] = ncc(pair.fixed[pair.mask], warped[pair.mask])
        local = lncc_map(torch.from_numpy(pair.fixed)[None, None], torch.from_numpy(warped)[None, None],
                         window=9, squared=False)[0, 0].numpy()
        row["lncc"] = float(local[pair.mask].mean())
    return row


def correlation_in(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two ``S`` images over ``mask``."""
    return float(np.corrcoef(a[mask].astype(np.float64), b[mask].astype(np.float64))[0, 1])


# ----------------------------------------------------------------------------- methods

def fingerprint(*parts) -> str:
    """Short hash of arrays and strings (cache key)."""
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else str(part).encode())
    return digest.hexdigest()[:10]


def slug(name: str) -> str:
    """A pair name as a file-name part (``a->b`` -> ``a_to_b``)."""
    return name.replace("->", "_to_")


def variant_settings(flags: str):
    """dirio Settings from ``dirio register`` flags (parsed by dirio's own CLI parser)."""
    args = build_parser().parse_args(["register", "FIXED", "MOVING", "-o", "OUT", *shlex.split(flags)])
    return settings_from_args(args)


def run_dirio(pair: Pair, flags: str, device: str, cache: Path) -> dict:
    """Register with a dirio variant (cached); returns ``disp``, ``wall_seconds``, ``cpu_seconds``."""
    path = cache / f"{slug(pair.name)}_dirio_{fingerprint(pair.fixed, pair.moving, flags, device)}.npz"
    if path.exists():
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}
    settings = variant_settings(flags + " -q")
    cpu0, wall0 = C.cpu_seconds(), time.perf_counter()
    result = register(pair.fixed, pair.moving, settings=settings, device=device)
    record = {"disp": result.disp.astype(np.float32), "wall_seconds": time.perf_counter() - wall0,
              "cpu_seconds": C.cpu_seconds() - cpu0}
    np.savez_compressed(path, **record)
    return record


def peer_available(python: str | None, peer: str) -> str | None:
    """None when ``python`` can import the peer's package, else the one-line reason to skip it."""
    if not python:
        return "no peer interpreter (give --peer-python or set DIRIO_PEER_PYTHON)"
    module = PEER_MODULES[peer]
    try:
        done = subprocess.run([python, "-c", f"import {module}, nibabel"], capture_output=True, text=True, timeout=120)
    except OSError as error:
        return f"{python}: {error}"
    return None if done.returncode == 0 else f"{python} cannot import {module}: {done.stderr.strip().splitlines()[-1]}"


def run_peer(pair: Pair, peer: str, python: str, cache: Path) -> dict:
    """Register with a peer in its own interpreter (cached); ``disp``, ``warped``, times, ``settings``."""
    path = cache / f"{slug(pair.name)}_{peer}_{fingerprint(pair.fixed, pair.moving)}.npz"
    if not path.exists():
        with tempfile.TemporaryDirectory() as tmp:
            save_image(f"{tmp}/fixed.nii.gz", pair.fixed, np.eye(4), overwrite=True)
            save_image(f"{tmp}/moving.nii.gz", pair.moving, np.eye(4), overwrite=True)
            done = subprocess.run([python, str(WORKER), peer, f"{tmp}/fixed.nii.gz", f"{tmp}/moving.nii.gz",
                                   f"{tmp}/out.npz"], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{peer} failed on {pair.name}:\n{done.stderr[-3000:]}")
            os.replace(f"{tmp}/out.npz", path)
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


def peer_pythons(values: list[str]) -> dict[str, str]:
    """``--peer-python`` values -> ``{peer: interpreter}``, ``""`` for the one of every other peer."""
    pythons = {"": os.environ.get("DIRIO_PEER_PYTHON")} if os.environ.get("DIRIO_PEER_PYTHON") else {}
    for value in values:
        peer, _, python = value.partition("=") if "=" in value.split("/")[0] else ("", "", value)
        pythons[peer] = python
    return pythons


def run_pair(pair: Pair, variants: dict, peers: list, args, cache: Path, peer_settings: dict,
             pythons: dict[str, str]) -> list[dict]:
    """Rows of one pair: the identity ("before"), every dirio variant and every peer, all scored alike."""
    rows = []
    base = {"set": pair.set, "pair": pair.name, **pair.info}
    if pair.true_disp is not None:
        base["true_percent_nonpositive_jacobian"] = 100.0 * fraction_nonpositive_jacobian(pair.true_disp)
        base["true_sdlogj_l2r"] = sdlogj_l2r(pair.true_disp)
    rows.append({**base, "method": "identity", **score(pair, np.zeros((*pair.fixed.shape, 3), np.float32))})
    for name, flags in variants.items():
        print(f"[{NAME}] {pair.name}: dirio {name} ...", file=sys.stderr, flush=True)
        out = run_dirio(pair, flags, args.device, cache)
        rows.append({**base, "method": name, "flags": flags, **score(pair, out["disp"]),
                     "wall_seconds": float(out["wall_seconds"]), "cpu_seconds": float(out["cpu_seconds"])})
    for peer in peers:
        print(f"[{NAME}] {pair.name}: {peer} ...", file=sys.stderr, flush=True)
        out = run_peer(pair, peer, pythons.get(peer, pythons.get("")), cache)
        peer_settings[peer] = str(out["settings"])
        check = apply_field(pair.moving, out["disp"])  # dirio's warp with the converted field vs the peer's own output
        flipped = apply_field(pair.moving, -out["disp"])
        rows.append({**base, "method": peer, **score(pair, out["disp"]),
                     "wall_seconds": float(out["wall_seconds"]), "cpu_seconds": float(out["cpu_seconds"]),
                     "check_r": correlation_in(pair.mask, check, out["warped"]),
                     "check_r_sign_flipped": correlation_in(pair.mask, flipped, out["warped"]),
                     "check_max_abs_diff": float(np.abs(check - out["warped"])[pair.mask].max())})
    return rows


# ----------------------------------------------------------------------------- tables

COLUMNS = (  # key, header, digits
    ("dice_aseg30", "Dice30", 3), ("dice_tissue", "tissue Dice", 3), ("dice_seg13", "Dice13", 3),
    ("ncc", "NCC", 3), ("lncc", "LNCC9", 3), ("epe", "EPE vox", 3), ("percent_nonpositive_jacobian", "% det<=0", 3),
    ("sdlogj_l2r", "SDlogJ", 3), ("ndv_percent", "NDV %", 3), ("wall_seconds", "wall s", 0),
    ("cpu_seconds", "CPU s", 0), ("check_r", "peer check r", 4),
)


def columns_for(rows: list[dict]):
    return [c for c in COLUMNS if any(c[0] in r for r in rows)]


def pair_table(rows: list[dict]) -> str:
    cols = columns_for(rows)
    body = [[r["pair"], r["method"], *(C.fmt(r.get(k), d) for k, _, d in cols)] for r in rows]
    return C.markdown_table(["pair", "method", *(h for _, h, _ in cols)], body)


def mean_table(rows: list[dict], methods: list[str]) -> str:
    cols = [c for c in columns_for(rows) if c[0] != "check_r"]
    body = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            cells = [C.fmt(float(np.mean([r[k] for r in mine])) if all(k in r for r in mine) else None, d)
                     for k, _, d in cols]
            total = [r["cpu_seconds"] for r in mine if "cpu_seconds" in r]
            body.append([method, len(mine), *cells, C.fmt(float(np.sum(total)) if total else None, 0)])
    return C.markdown_table(["method", "pairs", *(h for _, h, _ in cols), "CPU s total"], body)


# ----------------------------------------------------------------------------- main

def build_pairs(sets, args):
    """Yield the pairs of the chosen sets round-robin (first of each set, then the second...), so that a
    run stopped early has pairs of every set; ``--quick``: one per set."""
    makers = {}
    if "fine" in sets or "synth" in sets or "known" in sets:
        image, seg, label_ids, _ = C.load_voxelmorph_brain(NAME)
        ids = [int(v) for v in label_ids]
    count = 1 if args.quick else None
    if "fine" in sets:
        makers["fine"] = [lambda s=s: fine_pair(image, seg, ids, s) for s in args.fine_seeds[:count]]
    if "real" in sets:
        makers["real"] = [lambda p=p: real_pair(*p) for p in REAL_PAIRS[:1 if args.quick else args.real_pairs]]
    if "synth" in sets:
        makers["synth"] = [lambda s=s: synth_pair(seg, ids, s) for s in args.synth_seeds[:count]]
    if "known" in sets:
        makers["known"] = [lambda s=s: known_pair(image, seg, ids, s) for s in args.known_seeds[:count]]
    for index in range(max((len(m) for m in makers.values()), default=0)):
        for s in sets:
            if index < len(makers.get(s, [])):
                yield makers[s][index]()


def main(argv=None) -> None:
    parser = C.base_parser(NAME, __doc__.splitlines()[0], "brain-mri")
    parser.add_argument("--sets", default="fine,real,synth,known", help="comma-separated: fine, real, synth, known")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help="a dirio variant as `dirio register` flags (repeatable; default: " +
                        "; ".join(f"{k}={v!r}" for k, v in DEFAULT_VARIANTS.items()) + ")")
    parser.add_argument("--peer-python", action="append", default=[],
                        help="interpreter with the peers' packages, or PEER=PYTHON for one peer (repeatable; "
                        "default $DIRIO_PEER_PYTHON)")
    parser.add_argument("--peers", default="ants,dipy", help=f"peers to run, of {', '.join(PEERS)} "
                        "(comma-separated; '' for none)")
    parser.add_argument("--fine-seeds", type=C.int_list, default=(1, 2))
    parser.add_argument("--synth-seeds", type=C.int_list, default=(1, 2))
    parser.add_argument("--known-seeds", type=C.int_list, default=(1, 2))
    parser.add_argument("--from-partial", action="store_true",
                        help="compute nothing: tabulate <out>/rows.partial.jsonl (the progress record of a stopped run)")
    parser.add_argument("--real-pairs", type=int, default=len(REAL_PAIRS), help=f"how many of {REAL_PAIRS}")
    args = parser.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else dict(DEFAULT_VARIANTS)
    if args.quick:
        variants = {k: f"{v} --iterations {','.join(['3'] * len(variant_settings(v).pyramid.levels))}"
                    for k, v in variants.items()}
    for flags in variants.values():
        variant_settings(flags)  # refuse bad flags before any work
    notes, peers = [], []
    pythons = peer_pythons(args.peer_python)
    for peer in [p for p in args.peers.split(",") if p]:
        if peer not in PEERS:
            parser.error(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
        reason = "skipped in --quick" if args.quick else peer_available(pythons.get(peer, pythons.get("")), peer)
        if reason:
            print(f"[{NAME}] peer {peer} skipped: {reason}", file=sys.stderr)
            notes.append(f"peer {peer} skipped: {reason}")
        else:
            peers.append(peer)
    cache = Path(args.out) / "fields"
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(args.out) / "rows.partial.jsonl"
    cpu0, wall0 = C.cpu_seconds(), time.perf_counter()
    rows, peer_settings, methods = [], {}, ["identity", *variants, *peers]
    if args.from_partial:
        rows = [r for r in map(json.loads, partial.read_text().splitlines()) if r["set"] in sets]
        for peer in peers:
            for path in sorted(cache.glob(f"*_{peer}_*.npz"))[:1]:
                with np.load(path) as saved:
                    peer_settings[peer] = str(saved["settings"])
        notes.append(f"tables rebuilt from {partial.name} (--from-partial): run times below are of this step only")
    else:
        partial.write_text("")
    try:
        for pair in ([] if args.from_partial else build_pairs(sets, args)):
            done = run_pair(pair, variants, peers, args, cache, peer_settings, pythons)
            rows += done
            with open(Path(args.out) / "rows.partial.jsonl", "a") as log:  # progress record of a long run
                log.writelines(json.dumps(r) + "\n" for r in done)
    except KeyboardInterrupt:  # keep the pairs completed so far
        notes.append(f"stopped by the user after {len({r['pair'] for r in rows})} complete pairs")
    run = {"wall_seconds": time.perf_counter() - wall0, "cpu_seconds": C.cpu_seconds() - cpu0}
    tables = []
    for s in sets:
        mine = [r for r in rows if r["set"] == s]
        if mine:
            tables += [f"### set `{s}`: per pair", pair_table(mine), f"### set `{s}`: mean over pairs", mean_table(mine, methods)]
    true = [r for r in rows if r["method"] == "identity" and "true_sdlogj_l2r" in r]
    notes += [
        "Variants: " + "; ".join(f"`{k}` = `{v}`" for k, v in variants.items()) + f"; device {args.device}.",
        *(f"Peer `{p}`: {s}." for p, s in peer_settings.items()),
        "Peer fields validated per pair: `peer check r` = correlation (inside the fixed brain) of the moving image "
        "warped by dirio with the converted field against the peer's own warped output; with the field's sign "
        "flipped: " + ", ".join(f"{r['pair']}/{r['method']} {r['check_r_sign_flipped']:.3f}" for r in rows
                                if "check_r_sign_flipped" in r) + ".",
        "Known warps (fine, synth): coarse sigma %g max %g + fine sigma %g max %g voxels; true field " % (*COARSE, *FINE)
        + ", ".join(f"{r['pair']} SDlogJ {r['true_sdlogj_l2r']:.3f} %det<=0 {r['true_percent_nonpositive_jacobian']:.4f}"
                    for r in true) + ". fine-set moving profiles: "
        + ", ".join(f"{r['pair']} {r['profile']}" for r in true if "profile" in r) + ".",
        "Dice30: 30 VoxelMorph labels; Dice13: 13 bilateral classes (c2fA->vxm only); tissue Dice: CSF/GM/WM by "
        "3-class 1-D k-means per image; NCC: global, LNCC9: mean local NCC (window 9 box), both inside the fixed "
        "brain (fixed > 0), moving warped linearly by dirio; EPE: mean |u - u_true| voxels in the fixed brain; "
        "% det<=0 and SDlogJ (Learn2Reg) on the whole grid.",
        f"Whole run (this process + children, cached fields not recomputed): wall {run['wall_seconds']:.0f} s, "
        f"CPU {run['cpu_seconds']:.0f} s. Method wall/CPU s are those of the run that computed the cached field.",
    ]
    results = {"device": args.device, "sets": sets, "variants": variants, "peers": peers,
               "peer_settings": peer_settings, "run": run, "rows": rows}
    C.finish(NAME, "Brain validation sets: dirio variants vs ANTs SyN, dipy SyN, greedy and FireANTs", args, results, tables, notes)


if __name__ == "__main__":
    main()
