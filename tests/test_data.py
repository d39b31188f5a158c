"""Learn2Reg dataset JSON: case ids, pair names, companion files and the splits (dirio.io.dataset)."""

import json

import numpy as np
import pytest
from scipy import ndimage

from dirio.io.dataset import case_and_modality, load_dataset, sibling_path, write_synthetic_dataset
from dirio.errors import DirioError
from dirio.testing.synthetic import warped_pair


def write_json(path, content):
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_case_ids_are_the_part_before_the_modality_as_the_official_naming():
    assert case_and_modality("./imagesTr/OASIS_0001_0000.nii.gz") == ("0001", "0000")
    assert case_and_modality("imagesTs/NLST_0101_0001.nii") == ("0101", "0001")
    # the evaluator slices name[-16:-12]: the same 4 characters for standard names
    name = "./imagesTr/OASIS_0438_0000.nii.gz"
    assert case_and_modality(name)[0] == name[-16:-12]
    assert case_and_modality("brain.nii.gz") == ("brain", None)


def test_companion_files_live_in_the_sibling_folders_with_the_same_name():
    assert sibling_path("./imagesTr/X_0001_0000.nii.gz", "labels") == "labelsTr/X_0001_0000.nii.gz"
    assert sibling_path("./imagesTs/X_0001_0000.nii.gz", "keypoints", ".csv") == "keypointsTs/X_0001_0000.csv"
    assert sibling_path("X_0001_0000.nii.gz", "labels") is None


def test_validation_pairs_get_official_names_and_existing_companions_only(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        for case in ("0001", "0002", "0003"):
            touch(tmp_path / sub / f"OASIS_{case}_0000.nii.gz")
    touch(tmp_path / "keypointsTr" / "OASIS_0001_0000.csv")
    dataset_json = write_json(tmp_path / "OASIS_dataset.json", {
        "name": "OASIS",
        "labels": {"0": "background", "1": "a", "2": "b"},
        "registration_val": [
            {"fixed": "./imagesTr/OASIS_0001_0000.nii.gz", "moving": "./imagesTr/OASIS_0002_0000.nii.gz"},
            {"fixed": "./imagesTr/OASIS_0002_0000.nii.gz", "moving": "./imagesTr/OASIS_0003_0000.nii.gz"},
        ],
    })
    dataset = load_dataset(dataset_json)
    assert dataset.name == "OASIS" and dataset.label_ids == [1, 2]
    pairs = dataset.pairs("val")
    # the evaluator accepts the short name only for modalities 0000 <- 0001: OASIS pairs get the long one
    assert [p.name for p in pairs] == ["0001_0000_0002_0000", "0002_0000_0003_0000"]
    assert pairs[0].disp_name == "disp_0001_0000_0002_0000.nii.gz"
    assert pairs[0].case_key == "0001_0000<--0002_0000"
    assert pairs[0].fixed.image == tmp_path / "imagesTr" / "OASIS_0001_0000.nii.gz"
    assert pairs[0].fixed.labels == tmp_path / "labelsTr" / "OASIS_0001_0000.nii.gz"
    assert pairs[0].fixed.keypoints == tmp_path / "keypointsTr" / "OASIS_0001_0000.csv"
    assert pairs[0].moving.keypoints is None and pairs[0].fixed.mask is None
    with pytest.raises(DirioError, match="registration_test"):
        dataset.pairs("test")


def test_only_pairs_of_modalities_0000_and_0001_get_the_short_name(tmp_path):
    dataset_json = write_json(tmp_path / "d.json", {"registration_val": [
        {"fixed": "./imagesTr/L_0001_0000.nii.gz", "moving": "./imagesTr/L_0001_0001.nii.gz"},
        {"fixed": "./imagesTr/L_0001_0000.nii.gz", "moving": "./imagesTr/L_0001_0002.nii.gz"},
        {"fixed": "./imagesTr/L_0002_0001.nii.gz", "moving": "./imagesTr/L_0002_0000.nii.gz"},
    ]})
    names = [p.name for p in load_dataset(dataset_json).pairs("val")]
    assert names == ["0001_0001", "0001_0000_0001_0002", "0002_0001_0002_0000"]


def test_training_pairs_are_intra_case_when_cases_have_several_images(tmp_path):
    training = [{"image": f"./imagesTr/NLST_{c}_{m}.nii.gz"} for c in ("0001", "0002") for m in ("0000", "0001")]
    pairs = load_dataset(write_json(tmp_path / "d.json", {"training": training})).pairs("train")
    assert [(p.fixed.long_id, p.moving.long_id) for p in pairs] == [("0001_0000", "0001_0001"), ("0002_0000", "0002_0001")]


def test_training_pairs_are_consecutive_when_every_case_has_one_image(tmp_path):
    training = [{"image": f"./imagesTr/OASIS_{c}_0000.nii.gz", "label": f"./other/{c}.nii.gz"} for c in ("0001", "0002", "0003")]
    touch(tmp_path / "other" / "0002.nii.gz")
    pairs = load_dataset(write_json(tmp_path / "d.json", {"training": training})).pairs("train")
    assert [p.name for p in pairs] == ["0001_0000_0002_0000", "0002_0000_0003_0000"]
    # an explicit "label" of a training entry wins over the sibling folder
    assert pairs[0].moving.labels == tmp_path / "other" / "0002.nii.gz"
    assert pairs[0].fixed.labels is None


def test_a_registration_train_list_is_used_as_given(tmp_path):
    content = {"training": [{"image": "./imagesTr/A_0001_0000.nii.gz"}, {"image": "./imagesTr/A_0002_0000.nii.gz"}],
               "registration_train": [{"fixed": "./imagesTr/A_0002_0000.nii.gz", "moving": "./imagesTr/A_0001_0000.nii.gz"}]}
    assert [p.name for p in load_dataset(write_json(tmp_path / "d.json", content)).pairs("train")] == ["0002_0000_0001_0000"]


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read the dataset JSON"),
    ("[1, 2]", "must be an object"),
    ('{"registration_val": [{"fixed": 1}]}', "registration_val must be a list"),
    ('{"registration_val": []}', "has no pairs"),
])
def test_malformed_dataset_files_are_one_line_errors_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DirioError, match=message) as info:
        load_dataset(path).pairs("val")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_missing_dataset_file_is_an_error(tmp_path):
    with pytest.raises(DirioError, match="not found"):
        load_dataset(tmp_path / "missing.json")


def test_the_synthetic_dataset_has_the_learn2reg_layout_and_corresponding_keypoints(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 24, 28), dtype=np.int16)
    labels[4:10, 5:12, 6:14], labels[11:17, 12:20, 14:22] = 1, 2
    image = (labels * 0.4 + rng.random(labels.shape) * 0.1).astype(np.float32)
    path = write_synthetic_dataset(tmp_path, image, labels, np.diag([2.0, 2.0, 2.0, 1.0]), cases=3,
                                   max_displacement=1.5, sigma=4.0)
    dataset = load_dataset(path)
    assert dataset.label_ids == [1, 2]
    val = dataset.pairs("val")
    assert [p.name for p in val] == ["0001_0000_0002_0000", "0002_0000_0003_0000"]
    assert all(p.fixed.labels and p.fixed.mask and p.fixed.keypoints for p in val)
    points = np.loadtxt(val[0].fixed.keypoints, delimiter=",", ndmin=2)
    assert points.shape == (2, 3)
    # keypoints correspond exactly: case 2's points pulled through case 2's known field land on
    # case 1's label centroids (so a perfect registration has TRE 0)
    truth = warped_pair(image, labels, sigma=4.0, max_displacement=1.5, seed=2).true_disp
    moving_points = np.loadtxt(val[0].moving.keypoints, delimiter=",", ndmin=2)
    at_points = np.stack([ndimage.map_coordinates(truth[..., a], moving_points.T, order=1) for a in range(3)], axis=1)
    np.testing.assert_allclose(moving_points + at_points, points, atol=1e-3)
    assert np.abs(moving_points - points).max() > 0.2
    assert [p.name for p in dataset.pairs("test")] == ["0001_0000_0002_0000", "0001_0000_0003_0000"]
