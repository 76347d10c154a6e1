"""Build the sample datastores from the MNI ICBM152 2009a template that the ``nilearn`` wheel ships.

    pip download nilearn==0.14.1 --no-deps -d /tmp/nilearn
    python sample-datasets/make_samples.py /tmp/nilearn/nilearn-0.14.1-py3-none-any.whl

Writes (and the repository keeps):
  brain-2d/   20 PNG slices (10 axial, 10 coronal) of the T1 template; ground-truth/ white-matter masks
  brain-3d/   the T1 template at 2 mm (NIfTI); ground-truth/ labelmap 1 = white matter, 2 = grey matter
Masks are the template's tissue probability maps > 0.5. The datastores start without labels: segment
one image, save it, and the next one starts from it.
"""

from __future__ import annotations

import gzip
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

HERE = Path(__file__).parent
DATA = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def load(wheel: zipfile.ZipFile, name: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(wheel.read(DATA.format(name))))


def main(wheel_path: str) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        t1, gm, wm = (load(wheel, n) for n in ("t1", "gm", "wm"))
    t1a = np.asarray(t1.dataobj, np.float32)
    gma, wma = (np.asarray(x.dataobj, np.float32) > 127.5 for x in (gm, wm))

    out2d = HERE / "brain-2d"
    (out2d / "ground-truth").mkdir(parents=True, exist_ok=True)
    for axis, tag, indices in ((2, "axial", np.linspace(40, 150, 10)), (1, "coronal", np.linspace(50, 190, 10))):
        for k in indices.round().astype(int):
            # rows top-to-bottom = superior/anterior to inferior/posterior, as a radiologist looks at it
            image = np.rot90(np.take(t1a, k, axis=axis))
            mask = np.rot90(np.take(wma, k, axis=axis))
            name = f"mni152_{tag}_{k:03d}.png"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out2d / name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out2d / "ground-truth" / name)

    out3d = HERE / "brain-3d"
    (out3d / "ground-truth").mkdir(parents=True, exist_ok=True)
    affine = t1.affine.copy()
    affine[:3, :3] *= 2
    image = t1a[::2, ::2, ::2]
    labels = np.zeros(image.shape, np.uint8)
    labels[wma[::2, ::2, ::2]] = 1
    labels[gma[::2, ::2, ::2]] = 2
    nib.save(nib.Nifti1Image(np.clip(image, 0, 255).astype(np.uint8), affine), out3d / "mni152_t1_2mm.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), out3d / "ground-truth" / "mni152_t1_2mm.nii.gz")
    print(f"wrote {out2d} and {out3d}")


if __name__ == "__main__":
    main(sys.argv[1])
