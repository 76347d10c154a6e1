"""Write the bundled 3D sample volume as a DICOM series, to try the app against a PACS.

    python sample-datasets/make_dicom.py OUT_DIR [--volume sample-datasets/brain-3d/mni152_t1_2mm.nii.gz]

One file per slice along the volume's third axis (95 for the sample), modality MR, with the volume's
geometry: a DICOM reader (SimpleITK, MONAI Label's DICOMweb datastore) gets back the same array, in the
same voxel order ``[i, j, k]``, with the same affine. Upload it to a PACS by STOW-RS, e.g. with
``dicomweb_client`` (``DICOMwebClient(URL).store_instances([pydicom.dcmread(f) for f in files])``).
Nothing is committed as DICOM: the series is made from the NIfTI whenever it is needed.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "brain-3d" / "mni152_t1_2mm.nii.gz"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return f"{value:.10g}"[:16]


def write_series(volume: Path, out: Path, patient: str = "MNI152", description: str = "MNI152 T1 2mm") -> list[Path]:
    """Write ``volume`` (NIfTI, 3D) as one DICOM file per slice into ``out``; returns the files in slice order.

    Pixel ``(row r, column c)`` of slice ``k`` is voxel ``[c, r, k]``, so the DICOM column axis is the
    volume's first axis and the row axis its second, as ITK reads them back.
    """
    img = nib.load(str(volume))
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{volume}: need a 3D volume, got shape {data.shape}")
    data = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    affine = np.asarray(img.affine, float)
    lps = RAS_TO_LPS @ affine[:3, :3]  # voxel step -> LPS step, one column per voxel axis
    spacing = np.linalg.norm(lps, axis=0)
    cosines = lps / spacing
    out.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime.now()
    files = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / f"slice_{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = patient, patient
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.StudyDescription = "1", "", description
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "MR", 1, k + 1, description
        position = RAS_TO_LPS @ (affine @ np.array([0, 0, k, 1.0]))[:3]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([cosines[:, 0], cosines[:, 1]])]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # between rows, between columns
        ds.SliceThickness = _ds(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        ds.save_as(str(path), write_like_original=False)
        files.append(path)
    return files


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the DICOM files")
    parser.add_argument("--volume", type=Path, default=SAMPLE, help="NIfTI volume (default: the brain-3d sample)")
    args = parser.parse_args(argv)
    files = write_series(args.volume, args.out)
    print(f"{len(files)} DICOM files in {args.out}")


if __name__ == "__main__":
    main()
