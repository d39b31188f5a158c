"""Specification of dirio.io.atomic: outputs are never half-written and never silently replaced."""

import json
import math

import numpy as np
import pytest

from dirio.errors import DirioError
from dirio.io.atomic import atomic_output, check_writable, write_json, write_text


def _leftovers(directory):
    """Temporary files atomic_output may have left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))


def test_atomic_output_moves_the_temporary_file_onto_the_target(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    with atomic_output(target) as tmp:
        # The temporary name sits in the target's (created) directory and keeps the full suffix.
        assert tmp.parent == target.parent and target.parent.is_dir()
        assert tmp.name.startswith(".tmp-") and tmp.name.endswith("-out.nii.gz")
        assert not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert _leftovers(target.parent) == []


def test_atomic_output_keeps_the_old_file_and_removes_the_temporary_one_when_the_body_raises(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_output_leaves_nothing_when_a_new_file_fails(tmp_path):
    target = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_to_overwrite_without_the_flag(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(DirioError, match=r"out\.txt exists; pass `overwrite` to replace it"):
        with atomic_output(target) as tmp:
            tmp.write_text("new")  # never reached
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_output_replaces_with_the_flag(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_check_writable_names_the_first_existing_path(tmp_path):
    free, taken = tmp_path / "a.json", tmp_path / "b.json"
    taken.write_text("{}")
    check_writable([free], overwrite=False)  # nothing exists: no error
    check_writable([free, taken], overwrite=True)  # existing file allowed with the flag
    with pytest.raises(DirioError, match=r"b\.json exists; pass `overwrite`"):
        check_writable([free, taken], overwrite=False)
    with pytest.raises(DirioError, match="directory"):
        check_writable(tmp_path, overwrite=True)


def test_write_json_round_trips_indented_with_nan_and_numpy_values(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"dice": float("nan"), "tre": np.float32(1.5), "ids": np.arange(2)})
    text = target.read_text()
    assert '\n  "dice": NaN' in text  # indent 2, NaN literal allowed
    loaded = json.loads(text)
    assert math.isnan(loaded["dice"]) and loaded["tre"] == 1.5 and loaded["ids"] == [0, 1]
    with pytest.raises(DirioError, match="exists"):
        write_json(target, {})
    write_json(target, {"a": 1}, overwrite=True)
    assert json.loads(target.read_text()) == {"a": 1}


def test_write_text_writes_utf8_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "log.txt"
    write_text(target, "Δ = 1 mm\n")
    assert target.read_text(encoding="utf-8") == "Δ = 1 mm\n"
    with pytest.raises(DirioError, match="exists"):
        write_text(target, "other")
    assert target.read_text(encoding="utf-8") == "Δ = 1 mm\n"
