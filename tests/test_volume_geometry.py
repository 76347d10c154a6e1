"""Volumes as 3D Slicer sees them: Slicer reads every file with ITK (SimpleITK here), so an answer must lie
where ITK places the image, a label Slicer writes must be taken, and a label off the image's grid refused,
whatever the header says (qform, sform, both, neither, NRRD spaces, spacings only, 2D files, micrometres)."""

from __future__ import annotations

import os
import sys

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))

from mvlabel.errors import BadRequest  # noqa: E402
from mvlabel.imageio import read_image, read_label, write_label  # noqa: E402

SPACING = (0.8, 1.1, 2.5)
PLAIN = np.diag(SPACING + (1.0,))
PLAIN[:3, 3] = (10.0, -20.0, 30.0)
OTHER = PLAIN.copy()
OTHER[:3, 3] = (-3.0, 12.0, 4.0)
OBLIQUE = PLAIN.copy()
c, s = np.cos(0.5), np.sin(0.5)
OBLIQUE[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(SPACING)


def _nifti(shape=(14, 11, 6), qform=None, sform=None, units=None):
    def write(path):
        img = nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), None)
        img.header.set_zooms((SPACING + (1.0,))[:len(shape)])
        img.set_qform(*(qform or (None, 0)))
        img.set_sform(*(sform or (None, 0)))
        if units:
            img.header.set_xyzt_units(units)
        nib.save(img, path)
    return write


def _nrrd(shape=(14, 11, 6), **header):
    def write(path):
        nrrd.write(path, np.arange(np.prod(shape), dtype=np.int16).reshape(shape), header)
    return write


LPS = np.diag([0.8, 1.1, 2.5])
VARIANTS = {
    "nifti qform only": (".nii.gz", _nifti(qform=(PLAIN, 1))),
    "nifti sform only": (".nii.gz", _nifti(sform=(OBLIQUE, 2))),
    "nifti sform 2 beside another qform": (".nii.gz", _nifti(qform=(OBLIQUE, 1), sform=(OTHER, 2))),
    "nifti sform 1 beside another qform": (".nii.gz", _nifti(qform=(PLAIN, 1), sform=(OTHER, 1))),
    "nifti neither qform nor sform": (".nii.gz", _nifti()),
    "nifti in micrometres": (".nii.gz", _nifti(qform=(PLAIN, 1), sform=(PLAIN, 1), units="micron")),
    "nifti 4D of one volume": (".nii", _nifti(shape=(14, 11, 6, 1), qform=(PLAIN, 1))),
    "nifti 2D": (".nii.gz", _nifti(shape=(14, 11), qform=(PLAIN, 1))),
    "nrrd LPS": (".nrrd", _nrrd(space="left-posterior-superior", **{"space directions": LPS,
                                                                     "space origin": [3.0, 4.0, 5.0]})),
    "nrrd RAS": (".nrrd", _nrrd(space="right-anterior-superior", **{"space directions": LPS,
                                                                     "space origin": [3.0, 4.0, 5.0]})),
    "nrrd spacings only": (".nrrd", _nrrd(spacings=[0.8, 1.1, 2.5])),
    "nrrd 2D placed": (".nrrd", _nrrd(shape=(14, 11), **{"space dimension": 2, "space directions": np.diag([0.8, 1.1]),
                                                          "space origin": [3.0, 4.0]})),
    "nrrd 2D spacings only": (".nrrd", _nrrd(shape=(14, 11), spacings=[0.8, 1.1])),
}


def _same_place(a: sitk.Image, b: sitk.Image) -> None:
    n = min(a.GetDimension(), b.GetDimension())  # a 2D image's answer is one slice of a volume
    assert a.GetSpacing()[:n] == pytest.approx(b.GetSpacing()[:n], abs=1e-6)
    assert a.GetOrigin()[:n] == pytest.approx(b.GetOrigin()[:n], abs=1e-6)
    da, db = (np.reshape(x.GetDirection(), (x.GetDimension(),) * 2)[:n, :n] for x in (a, b))
    np.testing.assert_allclose(da, db, atol=1e-6)


@pytest.fixture(params=sorted(VARIANTS))
def image(request, tmp_path):
    suffix, write = VARIANTS[request.param]
    path = str(tmp_path / f"image{suffix}")
    write(path)
    return path, read_image(path), sitk.ReadImage(path)


def _mask(shape) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[2:7, 3:6, ...] = 1
    mask[0, 0, ...] = 1  # a corner: any flip or transposition moves it
    return mask


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_an_answer_lies_where_slicer_shows_the_image(image, suffix):
    _, loaded, shown = image
    mask = _mask(loaded.shape)
    path = write_label(mask, loaded, suffix)
    answer = sitk.ReadImage(path)
    os.unlink(path)
    _same_place(answer, shown)
    # the same voxel order as the image in ITK's array view
    got = sitk.GetArrayFromImage(answer).transpose()
    np.testing.assert_array_equal(got.reshape(mask.shape), mask)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_a_label_written_by_slicer_is_taken_and_one_off_the_grid_refused(image, suffix, tmp_path):
    _, loaded, shown = image
    mask = _mask(shown.GetSize())  # ITK's x-first size: the array as nibabel and pynrrd read it

    def slicer_label(name: str, origin_shift: float = 0.0, spacing_scale: float = 1.0) -> str:
        label = sitk.GetImageFromArray(mask.transpose())
        label.CopyInformation(shown)
        first_axis = np.reshape(shown.GetDirection(), (shown.GetDimension(),) * 2)[:, 0]
        label.SetOrigin(tuple(np.add(shown.GetOrigin(), origin_shift * shown.GetSpacing()[0] * first_axis)))
        label.SetSpacing(tuple(v * spacing_scale for v in shown.GetSpacing()))
        path = str(tmp_path / f"{name}{suffix}")
        sitk.WriteImage(label, path)
        return path

    np.testing.assert_array_equal(read_label(slicer_label("same"), loaded).reshape(mask.shape), mask)
    for name, shift, scale in (("half_voxel", 0.5, 1.0), ("one_voxel", 1.0, 1.0), ("finer", 0.0, 1.1)):
        with pytest.raises(BadRequest, match="not on the image's grid") as refused:
            read_label(slicer_label(name, shift, scale), loaded)
        assert refused.value.status == 422
