"""Learn2Reg dataset folders: the dataset JSON, its registration pairs and each image's files.

A Learn2Reg dataset is a folder with a JSON file (``OASIS_dataset.json``, ``NLST_dataset.json``...)
and the folders ``imagesTr`` (``imagesTs``), ``labelsTr``, ``masksTr``, ``keypointsTr``. The JSON
names the evaluation pairs under ``registration_val`` / ``registration_test`` as
``{"fixed": "./imagesTr/OASIS_0438_0000.nii.gz", "moving": "./imagesTr/OASIS_0439_0000.nii.gz"}``
(paths relative to the JSON's folder) and the training images under ``training``.

Rules (docs/how-to/datasets.md documents them for users):

* **Case ids.** An image file ``<anything>_<case>_<modality>.nii.gz`` (modality = 4 digits) has case
  id ``<case>`` and modality ``<modality>``: ``OASIS_0001_0000.nii.gz`` -> ``0001``, ``0000``. The
  official evaluator slices 4 characters (``name[-16:-12]``), which is the same for the standard
  4-digit names. A name without a ``_<4 digits>`` modality suffix uses its whole stem as case id.
* **Pair names** follow the official evaluator (eval_version 2.0), which takes the subject as the
  4 characters before ``_<modality>.nii.gz`` and the modality as those 4 digits, and accepts the
  short name ``disp_<fixedsubject>_<movingsubject>.nii.gz`` only for a fixed modality ``0000`` and
  a moving modality ``0001`` (NLST style), the long name
  ``disp_<fixedsubject>_<fixedmod>_<movingsubject>_<movingmod>.nii.gz`` always. So an NLST pair
  ``0001_0000 <- 0001_0001`` is ``disp_0001_0001.nii.gz`` and an OASIS pair ``0001_0000 <- 0002_0000``
  is ``disp_0001_0000_0002_0000.nii.gz``. A name without a 4-digit modality keeps its stem as case
  id (such a dataset cannot be scored by the evaluator).
* **Paths stay inside the dataset folder.** Every path of the JSON must lead, after ``..`` is
  resolved (lexically: symbolic links inside the folder are followed as usual), to a file inside
  the JSON's folder; an absolute path or one that climbs out is refused before any work unless
  the dataset is loaded with ``allow_outside=True`` (``dirio run --allow-outside-paths``).
* **Per-image files.** Labels, mask and keypoints of an image are taken from the ``training`` entry
  of that image when it names them (``label``, ``mask``, ``keypoints``), else from the sibling folder
  with ``images`` replaced by ``labels`` / ``masks`` / ``keypoints`` in the folder name, same file
  name (keypoints: ``.csv`` instead of ``.nii.gz``), as the evaluator looks them up. Each is
  optional: a file that does not exist is simply not used.
* **Splits.** ``val`` -> ``registration_val``, ``test`` -> ``registration_test``, ``train`` ->
  ``registration_train`` when the JSON has it, else pairs made from ``training``: when some case has
  several images (e.g. NLST's inspiration/expiration ``_0000``/``_0001``), each case's first
  modality is fixed and every other modality of that case is moving; otherwise (one image per case,
  e.g. OASIS) consecutive entries ``(training[i], training[i + 1])``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from dirio.errors import DirioError

SPLITS = {"val": "registration_val", "test": "registration_test", "train": "registration_train"}
# <anything>_<case>_<modality> with a 4-digit modality, as in every Learn2Reg dataset.
_CASE_PATTERN = re.compile(r"^(?:.*_)?([^_]+)_(\d{4})$")
_IMAGE_SUFFIXES = (".nii.gz", ".nii")


def image_stem(name: str) -> str:
    """File name without folders and without ``.nii.gz`` / ``.nii``."""
    base = PurePosixPath(name).name
    for suffix in _IMAGE_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def case_and_modality(name: str) -> tuple[str, str | None]:
    """Learn2Reg case id and modality of an image file name (see the module rules).

    ``"./imagesTr/OASIS_0001_0000.nii.gz"`` -> ``("0001", "0000")``; ``"brain.nii.gz"`` -> ``("brain", None)``.
    """
    stem = image_stem(name)
    match = _CASE_PATTERN.match(stem)
    if match is None:
        return stem, None
    # The evaluator's subject is the 4 characters before "_<modality>" (name[-16:-12] of the path).
    return stem[:-5][-4:], match.group(2)


@dataclass(frozen=True)
class CaseImage:
    """One image of the dataset and its optional companion files (absolute paths, ``None`` when absent).

    Attributes:
        entry: the path as written in the dataset JSON (e.g. ``./imagesTr/OASIS_0001_0000.nii.gz``).
        case, modality: ids from the file name (:func:`case_and_modality`).
    """

    entry: str
    image: Path
    labels: Path | None
    mask: Path | None
    keypoints: Path | None
    case: str
    modality: str | None

    @property
    def long_id(self) -> str:
        """``<case>_<modality>`` (the evaluator's per-case key part), or the case id without modality."""
        return self.case if self.modality is None else f"{self.case}_{self.modality}"


def field_stem(fixed: CaseImage, moving: CaseImage) -> str:
    """The pair's name as the official evaluator looks its field up: ``disp_<this>.nii.gz``.

    Short ``<fixedcase>_<movingcase>`` only for modalities ``0000`` <- ``0001`` (the one case the
    evaluator accepts it), long ``<fixedcase>_<fixedmod>_<movingcase>_<movingmod>`` otherwise.
    """
    if (fixed.modality, moving.modality) == ("0000", "0001") or fixed.modality is None or moving.modality is None:
        return f"{fixed.case}_{moving.case}"
    return f"{fixed.long_id}_{moving.long_id}"


@dataclass(frozen=True)
class Pair:
    """One registration pair of a split.

    Attributes:
        index: position in the split (0-based); the rank that registers it is ``index % world_size``.
        name: ``<fixedcase>_<movingcase>`` (or the long form, see the module rules).
    """

    index: int
    name: str
    fixed: CaseImage
    moving: CaseImage

    @property
    def disp_name(self) -> str:
        """``disp_<name>.nii.gz``, the Learn2Reg file name of the pair's field."""
        return f"disp_{self.name}.nii.gz"

    @property
    def case_key(self) -> str:
        """The evaluator's key of the pair in its ``cases`` dict: ``<fcase>_<fmod><--<mcase>_<mmod>``."""
        return f"{self.fixed.long_id}<--{self.moving.long_id}"


@dataclass
class Dataset:
    """A Learn2Reg dataset JSON and the folder it sits in.

    Attributes:
        path: the JSON file (absolute).
        root: its folder; every path of the JSON is relative to it.
        name: the dataset's ``name`` (or the JSON's stem).
        content: the parsed JSON.
        label_ids: the nonzero label ids of the JSON's ``labels`` dict, ``None`` when it has none.
    """

    path: Path
    root: Path
    name: str
    content: dict
    label_ids: list[int] | None
    allow_outside: bool = False

    def _inside(self, relative: str, what: str) -> Path:
        """``root / relative``, refused when it leads outside the dataset folder (unless allowed)."""
        path = self.root / relative
        if not self.allow_outside:
            normalised = Path(os.path.normpath(path))
            if Path(relative).is_absolute() or not normalised.is_relative_to(Path(os.path.normpath(self.root))):
                raise DirioError(
                    f"{self.path}: the {what} path {relative!r} leads outside the dataset folder {self.root}; "
                    f"move the file into it, or pass `allow_outside` to use it"
                )
        return path

    def pairs(self, split: str) -> list[Pair]:
        """The registration pairs of ``split`` (``val``, ``test`` or ``train``), in dataset order.

        Raises:
            DirioError: unknown split, or the JSON has no pairs for it.
        """
        if split not in SPLITS:
            raise DirioError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        key = SPLITS[split]
        if key in self.content:
            entries = self.content[key]
            if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("fixed"), str) and isinstance(e.get("moving"), str)
                for e in entries
            ):
                raise DirioError(f"{self.path}: {key} must be a list of {{\"fixed\": ..., \"moving\": ...}} entries")
            couples = [(e["fixed"], e["moving"]) for e in entries]
        elif split == "train":
            couples = self._training_couples()
        else:
            raise DirioError(f"{self.path}: has no {key!r} list (split {split!r})")
        if not couples:
            raise DirioError(f"{self.path}: split {split!r} has no pairs")
        images = [(self.case_image(f), self.case_image(m)) for f, m in couples]
        names = [field_stem(f, m) for f, m in images]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise DirioError(f"{self.path}: split {split!r} lists the pair {duplicate} more than once")
        return [Pair(i, name, f, m) for i, (name, (f, m)) in enumerate(zip(names, images))]

    def _training_couples(self) -> list[tuple[str, str]]:
        training = self.content.get("training")
        if not isinstance(training, list) or not training:
            raise DirioError(f"{self.path}: split 'train' needs a 'registration_train' list or a 'training' list")
        images = [self._entry_image(entry) for entry in training]
        by_case: dict[str, list[str]] = {}
        for image in images:
            by_case.setdefault(case_and_modality(image)[0], []).append(image)
        if any(len(group) > 1 for group in by_case.values()):
            couples = []
            for group in by_case.values():
                ordered = sorted(group, key=lambda image: case_and_modality(image)[1] or "")
                couples.extend((ordered[0], other) for other in ordered[1:])
            return couples
        return list(zip(images[:-1], images[1:]))

    def _entry_image(self, entry) -> str:
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str):
            raise DirioError(f"{self.path}: every 'training' entry needs an \"image\" path, got {entry!r}")
        return image

    def _training_entry(self, image: str) -> dict | None:
        for entry in self.content.get("training") or []:
            if isinstance(entry, dict) and isinstance(entry.get("image"), str):
                if _normalised(entry["image"]) == _normalised(image):
                    return entry
        return None

    def case_image(self, entry: str) -> CaseImage:
        """The image of a JSON path and its companion files (those that exist)."""
        explicit = self._training_entry(entry) or {}
        companions = {}
        for kind, key, folder, suffix in (
            ("labels", "label", "labels", None),
            ("mask", "mask", "masks", None),
            ("keypoints", "keypoints", "keypoints", ".csv"),
        ):
            given = explicit.get(key)
            candidate = given if isinstance(given, str) else sibling_path(entry, folder, suffix)
            path = None if candidate is None else self._inside(candidate, key)
            companions[kind] = path if path is not None and path.is_file() else None
        case, modality = case_and_modality(entry)
        return CaseImage(entry=entry, image=self._inside(entry, "image"), case=case, modality=modality, **companions)


def _normalised(path: str) -> str:
    return str(PurePosixPath(path.replace("\\", "/")))


def sibling_path(entry: str, folder: str, suffix: str | None = None) -> str | None:
    """``./imagesTr/X.nii.gz`` -> ``./<folder>Tr/X.nii.gz`` (``images`` replaced in the folder names).

    With ``suffix`` the image suffix is replaced (``.csv`` for keypoints). ``None`` when no folder
    of the path starts with ``images``.
    """
    parts = list(PurePosixPath(entry.replace("\\", "/")).parts)
    changed = False
    for index, part in enumerate(parts[:-1]):
        if part.startswith("images"):
            parts[index] = folder + part[len("images"):]
            changed = True
    if not changed:
        return None
    if suffix is not None:
        parts[-1] = image_stem(parts[-1]) + suffix
    return str(PurePosixPath(*parts))


def load_dataset(path: str | Path, allow_outside: bool = False) -> Dataset:
    """Read a Learn2Reg dataset JSON (``allow_outside``: accept paths leading outside its folder).

    Raises:
        DirioError: naming the file, when it is missing, not JSON, or not a JSON object.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise DirioError(f"{path}: dataset JSON not found")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DirioError(f"{path}: cannot read the dataset JSON ({reason})") from None
    if not isinstance(content, dict):
        raise DirioError(f"{path}: a dataset JSON must be an object with registration_val/registration_test lists")
    label_ids = None
    labels = content.get("labels")
    if isinstance(labels, dict):
        try:
            label_ids = sorted(int(key) for key in labels if int(key) != 0)
        except ValueError:
            raise DirioError(f"{path}: the keys of 'labels' must be integer label ids, got {list(labels)}") from None
    name = content.get("name") if isinstance(content.get("name"), str) else path.stem
    return Dataset(path=path, root=path.parent, name=name, content=content, label_ids=label_ids or None,
                   allow_outside=allow_outside)


def _points_mapped_onto(targets: np.ndarray, disp: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Points ``x`` with ``x + disp(x) = targets`` (fixed-point iteration, trilinear ``disp``).

    Args:
        targets: ``(N, ndim)`` voxel coordinates.
        disp: ``(*S, ndim)`` smooth displacement in voxels (contractive: |grad disp| < 1).
    Returns:
        ``(N, ndim)`` voxel coordinates.
    """
    from scipy import ndimage

    points = np.array(targets, dtype=np.float64)
    for _ in range(iterations):
        at_points = np.stack([ndimage.map_coordinates(disp[..., axis], points.T, order=1, mode="nearest")
                              for axis in range(disp.shape[-1])], axis=1)
        points = targets - at_points
    return points


def write_synthetic_dataset(
    folder: str | Path,
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    *,
    cases: int = 4,
    name: str = "SYNTH",
    max_displacement: float = 3.0,
    sigma: float = 6.0,
    keypoint_labels: int = 12,
    masks: bool = True,
    seed: int = 0,
) -> Path:
    """Write a small Learn2Reg-style dataset made from one image by known smooth warps.

    Case 1 is ``image`` itself; case ``k > 1`` is ``image`` warped by a smooth random field
    (:func:`dirio.testing.synthetic.warped_pair`, seed ``seed + k``). Every case gets ``imagesTr/<name>_<kkkk>_0000.nii.gz``,
    its label map in ``labelsTr``, a brain mask (``labels > 0``) in ``masksTr`` when ``masks``, and
    keypoints in ``keypointsTr``: exactly corresponding points, one CSV row each: in case 1 the voxel
    centroids of the first ``keypoint_labels`` labels present in every case, in case ``k`` the points
    ``x`` with ``x + u_k(x)`` = those centroids (``u_k`` the known field of case ``k``, inverted by
    fixed-point iteration), so a perfect registration has TRE 0. (Centroids of the warped label maps
    would not correspond: a region's centroid does not move with the field at the centroid.) The JSON lists every case under ``training``,
    consecutive cases ``(k, k + 1)`` under ``registration_val`` and ``(1, k)`` under ``registration_test``.

    Args:
        folder: created if missing; the JSON is ``<folder>/<name>_dataset.json``.
        image, labels: ``S`` intensity image and integer label map on the same grid.
        affine: their ``(4, 4)`` voxel -> world affine.
    Returns:
        The dataset JSON's path.
    """
    from scipy import ndimage

    from dirio.io.images import save_image
    from dirio.testing.synthetic import warped_pair

    folder = Path(folder)
    for sub in ("imagesTr", "labelsTr", "masksTr", "keypointsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    images, label_maps = [np.asarray(image, dtype=np.float32)], [np.asarray(labels).astype(np.int16)]
    fields = [None]
    for k in range(2, cases + 1):
        pair = warped_pair(image, np.asarray(labels).astype(np.int16), sigma=sigma,
                           max_displacement=max_displacement, seed=seed + k)
        images.append(pair.fixed)
        label_maps.append(pair.fixed_labels)
        fields.append(pair.true_disp)
    common = set(np.unique(label_maps[0]).tolist()) - {0}
    for label_map in label_maps[1:]:
        common &= set(np.unique(label_map).tolist())
    point_labels = sorted(common)[:keypoint_labels]
    centroids = np.asarray(ndimage.center_of_mass(np.ones_like(label_maps[0]), label_maps[0], point_labels))
    training = []
    for k, (volume, label_map, true_disp) in enumerate(zip(images, label_maps, fields), start=1):
        stem = f"{name}_{k:04d}_0000"
        save_image(folder / "imagesTr" / f"{stem}.nii.gz", volume, affine, overwrite=True)
        save_image(folder / "labelsTr" / f"{stem}.nii.gz", label_map, affine, overwrite=True)
        entry = {"image": f"./imagesTr/{stem}.nii.gz", "label": f"./labelsTr/{stem}.nii.gz"}
        if masks:
            save_image(folder / "masksTr" / f"{stem}.nii.gz", (label_map > 0).astype(np.uint8), affine, overwrite=True)
            entry["mask"] = f"./masksTr/{stem}.nii.gz"
        points = centroids if true_disp is None else _points_mapped_onto(centroids, true_disp)
        rows = "".join(",".join(f"{c:.4f}" for c in point) + "\n" for point in points)
        (folder / "keypointsTr" / f"{stem}.csv").write_text(rows, encoding="utf-8")
        entry["keypoints"] = f"./keypointsTr/{stem}.csv"
        training.append(entry)
    content = {
        "name": name,
        "description": "synthetic Learn2Reg-style dataset (dirio.io.dataset.write_synthetic_dataset)",
        "tensorImageShape": {"0": list(np.shape(image))},
        "labels": {"0": "background", **{str(int(v)): f"label {int(v)}" for v in sorted(common)}},
        "modality": {"0": "MRI"},
        "numTraining": cases,
        "training": training,
        "registration_val": [{"fixed": training[k]["image"], "moving": training[k + 1]["image"]}
                             for k in range(cases - 1)],
        "registration_test": [{"fixed": training[0]["image"], "moving": training[k]["image"]}
                              for k in range(1, cases)],
    }
    path = folder / f"{name}_dataset.json"
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return path
