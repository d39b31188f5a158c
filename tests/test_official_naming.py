"""Field file names as the official Learn2Reg evaluator (eval_version 2.0) looks them up.

The evaluator takes, from each image path of a pair in the dataset JSON, the subject as
``path[-16:-12]`` and the modality as ``path[-11:-7]`` (the 4 characters before
``_<modality>.nii.gz`` and those 4 digits). It accepts ``disp_<fixsubject>_<movsubject>`` only when
the fixed modality is ``0000`` and the moving one ``0001`` (NLST style) and always accepts
``disp_<fixsubject>_<fixmodality>_<movsubject>_<movmodality>``. The expected names here are built
from the JSON text with that rule alone, independently of dirio's naming code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from dirio.apps.cli import main
from dirio.io.dataset import load_dataset


def evaluator_finds(pair: dict, folder: Path) -> str | None:
    """The file the evaluator would read for ``pair`` in ``folder``, or None (it would refuse the folder)."""
    fixed, moving = pair["fixed"], pair["moving"]
    fix_subject, fix_modality = fixed[-16:-12], fixed[-11:-7]
    mov_subject, mov_modality = moving[-16:-12], moving[-11:-7]
    short = f"disp_{fix_subject}_{mov_subject}.nii.gz"
    long = f"disp_{fix_subject}_{fix_modality}_{mov_subject}_{mov_modality}.nii.gz"
    if fix_modality == "0000" and mov_modality == "0001" and (folder / short).is_file():
        return short
    return long if (folder / long).is_file() else None


def expected_name(pair: dict) -> str:
    """The one name the evaluator finds for every version of its rule: short for 0000 <- 0001, else long."""
    fixed, moving = pair["fixed"], pair["moving"]
    if fixed[-11:-7] == "0000" and moving[-11:-7] == "0001":
        return f"disp_{fixed[-16:-12]}_{moving[-16:-12]}.nii.gz"
    return f"disp_{fixed[-16:-12]}_{fixed[-11:-7]}_{moving[-16:-12]}_{moving[-11:-7]}.nii.gz"


DATASETS = {
    "oasis (all _0000)": [("OASIS_0438_0000", "OASIS_0439_0000"), ("OASIS_0439_0000", "OASIS_0440_0000")],
    "nlst (_0000 <- _0001)": [("NLST_0101_0000", "NLST_0101_0001"), ("NLST_0102_0000", "NLST_0102_0001")],
    "mixed modalities": [("AbdomenMRCT_0001_0001", "AbdomenMRCT_0001_0000"),
                         ("ThoraxCBCT_0011_0000", "ThoraxCBCT_0011_0002"),
                         ("ThoraxCBCT_0011_0001", "ThoraxCBCT_0011_0002")],
    "five-digit case ids": [("X_12345_0000", "X_12346_0001")],
}


@pytest.mark.parametrize("pairs", list(DATASETS.values()), ids=list(DATASETS))
def test_every_field_is_named_as_the_evaluator_looks_it_up(tmp_path, pairs):
    entries = [{"fixed": f"./imagesTr/{f}.nii.gz", "moving": f"./imagesTr/{m}.nii.gz"} for f, m in pairs]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"name": "T", "registration_val": entries}))
    names = [pair.disp_name for pair in load_dataset(path).pairs("val")]
    assert names == [expected_name(entry) for entry in entries]
    for name in names:
        (tmp_path / name).touch()
    assert [evaluator_finds(entry, tmp_path) for entry in entries] == names
    keys = [pair.case_key for pair in load_dataset(path).pairs("val")]
    assert keys == [f"{e['fixed'][-16:-12]}_{e['fixed'][-11:-7]}<--{e['moving'][-16:-12]}_{e['moving'][-11:-7]}"
                    for e in entries]


def _save(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))


def test_a_dirio_run_folder_holds_the_file_the_evaluator_reads_for_every_pair(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    images = []
    for case in ("0001", "0002"):
        for modality in ("0000", "0001"):
            volume = gaussian_filter(rng.standard_normal((12, 12, 12)), 2.0).astype(np.float32)
            _save(root / "imagesTr" / f"T_{case}_{modality}.nii.gz", volume)
            images.append(f"./imagesTr/T_{case}_{modality}.nii.gz")
    entries = [{"fixed": images[0], "moving": images[1]},   # NLST style: short name
               {"fixed": images[0], "moving": images[2]}]   # OASIS style: long name
    (root / "T_dataset.json").write_text(json.dumps({"name": "T", "registration_val": entries}))
    out = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["run", str(root / "T_dataset.json"), "-o", str(out), "-q", "--no-report",
                   "--levels", "2,1", "--iterations", "3,2"])
    assert rc == 0, err.getvalue()
    found = [evaluator_finds(entry, out) for entry in entries]
    assert found == ["disp_0001_0001.nii.gz", "disp_0001_0000_0002_0000.nii.gz"]
    assert sorted(found) == sorted(name for name in os.listdir(out) if name.startswith("disp_"))
