"""Which DICOM series can hold a SEG (``mvlabel.dicomweb.check_seg_grid``): those whose slices lie on one
regular grid, as dcmqi writes the SEG on it; header positions rounded as scanners write them must pass."""

from __future__ import annotations

import importlib.util
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))


def _series(tmp_path, spacing: float = 2.0, degrees: float = 0.0, slices: int = 10, change=None):
    """A series written as a scanner would (sample-datasets/make_dicom.py), then ``change(k, dataset)``."""
    spec = importlib.util.spec_from_file_location("make_dicom", ROOT / "sample-datasets" / "make_dicom.py")
    make_dicom = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_dicom)
    t = np.radians(degrees)
    rotation = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.7, spacing])
    affine[:3, 3] = [-20.3, 11.7, 40.1]
    nib.save(nib.Nifti1Image(np.zeros((16, 16, slices), np.float32), affine), str(tmp_path / "v.nii.gz"))
    files = make_dicom.write_series(tmp_path / "v.nii.gz", tmp_path / "series")
    for k, path in enumerate(files):
        if change is not None:
            dataset = pydicom.dcmread(str(path))
            change(k, dataset)
            dataset.save_as(str(path))
    return tmp_path / "series"


def _rounded(decimals):
    def change(k, dataset):
        dataset.ImagePositionPatient = [round(float(v), decimals) for v in dataset.ImagePositionPatient]
    return change


def _shifted(k, dataset, by=(0.0, 0.0, 0.0)):
    dataset.ImagePositionPatient = [float(v) + d for v, d in zip(dataset.ImagePositionPatient, by)]


@pytest.mark.parametrize("spacing, degrees, slices, change", [
    (2.0, 0, 10, None),
    (0.625, 0, 10, _rounded(2)),  # thin slices, positions to 0.01 mm
    (1.0, 17, 10, _rounded(2)),  # oblique
    (3.0, 17, 10, _rounded(1)),
    (2.0, 0, 1, None),  # one slice
])
def test_a_regular_series_can_hold_a_seg(tmp_path, spacing, degrees, slices, change):
    from mvlabel.dicomweb import check_seg_grid

    check_seg_grid(str(_series(tmp_path, spacing, degrees, slices, change)))


@pytest.mark.parametrize("change, word", [
    (lambda k, d: _shifted(k, d, (0, 0, 1.5 if k > 5 else 0)), "evenly spaced"),  # a gap
    (lambda k, d: _shifted(k, d, (0, 0.7 * k, 0)), "tilted"),  # a gantry tilt
    (lambda k, d: setattr(d, "ImageOrientationPatient", [1, 0, 0, 0, 0.9, 0.43589]) if k == 3 else None,
     "oriented alike"),
    (lambda k, d: delattr(d, "ImagePositionPatient"), "geometry"),  # secondary captures
])
def test_a_series_off_a_regular_grid_cannot(tmp_path, change, word):
    from mvlabel.dicomweb import check_seg_grid
    from mvlabel.errors import BadRequest

    with pytest.raises(BadRequest, match=word) as refused:
        check_seg_grid(str(_series(tmp_path, change=change)))
    assert refused.value.status == 422
