"""The bundled sample datastores: readable by the app, ground truth on the image grid, segmentable."""

import sys

import nibabel as nib
import numpy as np

from mvseg import Predictor, Prompts

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
from mvlabel.imageio import read_image  # noqa: E402

SAMPLES = ROOT / "sample-datasets"


def test_sample_datastores_have_matching_ground_truth():
    for name, n, volume in (("brain-2d", 20, False), ("brain-3d", 1, True)):
        images = sorted(p for p in (SAMPLES / name).iterdir() if p.is_file())
        assert len(images) == n, name
        for path in images:
            image = read_image(str(path))
            truth = read_image(str(SAMPLES / name / "ground-truth" / path.name))
            assert image.is_volume == volume and truth.shape == image.shape
            assert truth.array.any()


def test_default_weights_segment_a_sample_slice():
    image = read_image(str(SAMPLES / "brain-2d" / "mni152_axial_089.png")).array
    truth = read_image(str(SAMPLES / "brain-2d" / "ground-truth" / "mni152_axial_089.png")).array > 0
    ys, xs = np.nonzero(truth)
    i = len(xs) // 2
    prediction = Predictor(device="cpu").predict(image, Prompts(positive=[(xs[i], ys[i])]))
    assert prediction.mask.shape == truth.shape
    assert prediction.mask[ys[i], xs[i]] == 1  # the clicked structure is in the mask


def test_make_dicom_writes_the_volume_as_a_series_readers_get_back_exactly(tmp_path):
    import importlib.util

    import SimpleITK as sitk

    spec = importlib.util.spec_from_file_location("make_dicom", ROOT / "sample-datasets" / "make_dicom.py")
    make_dicom = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_dicom)
    files = make_dicom.write_series(make_dicom.SAMPLE, tmp_path / "series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "back.nii.gz"))
    back, source = nib.load(str(tmp_path / "back.nii.gz")), nib.load(str(make_dicom.SAMPLE))
    assert len(files) == source.shape[2] and back.shape == source.shape
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(source.dataobj))
