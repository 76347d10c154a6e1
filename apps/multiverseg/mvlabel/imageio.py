"""Reading images and labels, and writing results on the input's own grid.

2D images (PNG, JPEG, TIFF, BMP) are read with Pillow as ``H W`` or ``H W C``: a click ``[x, y]`` is
(column, row), as MONAI's 2D loader orders it. In a volume format (NIfTI, NRRD) a 2D image's label is
``W H`` (or ``W H 1``): its first axis is x, as ITK, Slicer and OHIF read the image; labels are read and
results written in that order, so a mask never comes back transposed. Volumes (NIfTI with nibabel, NRRD with pynrrd) keep the
voxel order of the file, ``[i, j, k]``, which is the order ITK/MONAI (hence Slicer and OHIF) use.
Results are written with the input's shape, voxel order and geometry (affine / NRRD space), in the
format the client asks for. Labels may also be ASAP XML polygons (what QuPath saves).
"""

from __future__ import annotations

import bz2
import os
import tempfile
import xml.etree.ElementTree as ET
import zlib
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import nrrd
import numpy as np
import SimpleITK as sitk
from PIL import Image

from .errors import BadRequest

IMAGE_2D = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI = (".nii.gz", ".nii")
NRRD = (".nrrd", ".nhdr")
# NRRD space -> sign flips that take its axes to RAS
_TO_RAS = {
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
}


def extension(path: str) -> str:
    name = os.path.basename(str(path)).lower()
    for ext in NIFTI + NRRD + IMAGE_2D + (".xml",):
        if name.endswith(ext):
            return ext
    return os.path.splitext(name)[1]


@dataclass
class Loaded:
    """An image as read: the array, whether it is a volume, and what is needed to write on its grid."""

    array: np.ndarray  # 2D: H W [C]; volume: I J K
    path: str
    ext: str
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))  # voxel -> RAS (volumes)
    header: Any = None  # nibabel header / NRRD header of the source
    shown: Optional[np.ndarray] = None  # voxel -> RAS of a NIfTI as Slicer (ITK) places it (None: other formats)

    @property
    def as_shown(self) -> np.ndarray:
        """voxel -> RAS as Slicer places the file: ITK's placing for a NIfTI, ``affine`` otherwise."""
        return self.affine if self.shown is None else self.shown

    @property
    def is_volume(self) -> bool:
        return self.ext in NIFTI + NRRD

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape (channels of a 2D colour image left out)."""
        return tuple(self.array.shape[:3] if self.is_volume else self.array.shape[:2])


def _itk_affine(path: str) -> Optional[np.ndarray]:
    """voxel -> RAS of a NIfTI as ITK (Slicer, SimpleITK) places it. Not always nibabel's placing: a header
    with neither qform nor sform (ITK: at the origin; nibabel: centred), or with an sform of code 2-4 beside a
    qform (ITK takes the qform, nibabel the sform)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    n = min(reader.GetDimension(), 3)
    lps = np.eye(4)
    lps[:n, :n] = np.array(reader.GetDirection()).reshape(reader.GetDimension(), -1)[:n, :n] * reader.GetSpacing()[:n]
    lps[:n, 3] = reader.GetOrigin()[:n]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _nrrd_affine(header: dict) -> np.ndarray:
    """voxel -> RAS of an NRRD as ITK (Slicer) places it: along its space directions, or else its spacings,
    from its space origin (else 0), in LPS unless its space says otherwise. A 2D NRRD lies in the plane z = 0."""
    lps = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        rows = [r for r in directions if r is not None and not np.isnan(np.asarray(r, float)).any()]
        d = np.array(rows, float)
        if d.ndim == 2 and d.shape[0] == d.shape[1] <= 3:
            lps[:len(d), :len(d)] = d.T
    elif header.get("spacings") is not None:
        spacings = [float(v) for v in np.atleast_1d(header["spacings"])[:3]]
        for i, v in enumerate(spacings):
            lps[i, i] = v if np.isfinite(v) and v > 0 else 1.0
    origin = header.get("space origin")
    if origin is not None and 1 < np.size(origin) <= 3 and np.isfinite(np.asarray(origin, float)).all():
        lps[:np.size(origin), 3] = np.asarray(origin, float).ravel()
    flip = np.array(_TO_RAS.get(str(header.get("space", "lps")).lower(), (-1, -1, 1)) + (1,), float)
    return flip[:, None] * lps


# Largest image the server reads, in pixels (voxels for volumes); the app sets it (--conf max_pixels).
# Checked from the header, before any decoding: a small file can hold a huge image (decompression bomb).
MAX_PIXELS = 100_000_000


def _check_size(shape, path: str) -> None:
    pixels = int(np.prod([int(n) for n in shape]))
    if pixels > MAX_PIXELS:
        raise BadRequest(
            f"image {os.path.basename(path)} has {pixels:,} pixels ({' x '.join(str(int(n)) for n in shape)}); "
            f"this server reads at most {MAX_PIXELS:,}", 413)


def _check_nrrd(path: str) -> None:
    """Refuse what pynrrd should not read: a detached header (it reads whatever file it names), sizes that are
    not all positive or over :data:`MAX_PIXELS`, compressed data that holds more bytes than the sizes say
    (pynrrd inflates the whole stream before it compares: 2 KB of bzip2 took 5 GB)."""
    with open(path, "rb") as fh:
        header = nrrd.read_header(fh)
        if "data file" in header or "datafile" in header:
            raise BadRequest("a detached NRRD header ('data file') is not accepted: send a .nrrd with "
                             "its data attached", 422)
        sizes = [int(n) for n in header["sizes"]]
        _check_size(sizes, path)
        if min(sizes) < 1:
            raise BadRequest(f"image {os.path.basename(path)} has sizes {sizes}: every size must be positive", 422)
        encoding = header.get("encoding", "")
        if encoding not in ("gzip", "gz", "bzip2", "bz2"):
            return  # raw or text: no bigger than the file
        for _ in range(max(0, int(header.get("line skip", header.get("lineskip", 0))))):
            fh.readline()
        expected = int(np.prod(sizes)) * nrrd.reader._determine_datatype(header).itemsize
        limit = expected + max(0, int(header.get("byte skip", header.get("byteskip", 0))))
        if _inflates_beyond(fh, encoding in ("gzip", "gz"), limit):
            raise BadRequest(f"image {os.path.basename(path)} holds more data than its sizes "
                             f"({' x '.join(map(str, sizes))}) say", 422)


def _inflates_beyond(fh, gzip: bool, limit: int) -> bool:
    """Whether the gzip or bzip2 stream read from ``fh`` inflates to more than ``limit`` bytes; never holds
    more than one chunk of its output."""
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 16) if gzip else bz2.BZ2Decompressor()
    total = 0
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        while True:
            total += len(inflate.decompress(chunk, min(1 << 24, limit + 1 - total)))
            if total > limit:
                return True
            if gzip:
                chunk = inflate.unconsumed_tail
                if not chunk:
                    break
            elif inflate.eof or inflate.needs_input:
                break
            else:
                chunk = b""
    return False


def read_image(path: str, indices: bool = False) -> Loaded:
    """Read a 2D image or a volume; unreadable or empty files raise :class:`BadRequest` (415/422), images
    over :data:`MAX_PIXELS` raise it with 413 before they are decoded. ``indices``: a label's palette PNG is
    read as its indices (labelme, VOC: the index is the label value), a 1-bit one as 0/1; else (an image)
    transparent pixels are black."""
    path = str(path)
    ext = extension(path)
    if not os.path.isfile(path):
        raise BadRequest(f"image file not found: {os.path.basename(path)}", 404)
    try:
        if ext in NIFTI:
            img = nib.load(path)
            _check_size(img.shape, path)
            array = np.asanyarray(img.dataobj)
            loaded = Loaded(array, path, ext, np.asarray(img.affine, float), img.header, _itk_affine(path))
        elif ext in NRRD:
            _check_nrrd(path)
            array, header = nrrd.read(path)
            loaded = Loaded(array, path, ext, _nrrd_affine(header), header)
        elif ext in IMAGE_2D:
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb check (at open), at the same limit
            with Image.open(path) as im:
                _check_size(im.size, path)
                if getattr(im, "n_frames", 1) > 1:  # Pillow would take the first page alone
                    raise BadRequest(f"{os.path.basename(path)} holds {im.n_frames} pages or frames: send one 2D "
                                     "image per file (a volume as NIfTI or NRRD)", 422)
                im.load()
                if indices and im.mode in ("P", "1"):
                    array = np.asarray(im).astype(np.uint8)
                else:
                    transparent = im.mode in ("LA", "PA", "RGBA") or (im.mode == "P" and "transparency" in im.info)
                    if transparent and not indices:  # an image; a label's alpha is checked by read_label
                        # what shows through transparent pixels is black, not whatever colour they hold
                        grey = im.mode == "LA"
                        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
                        im = im.convert("L" if grey else "RGB")
                    elif im.mode in ("P", "LA", "PA", "CMYK", "YCbCr", "1"):
                        im = im.convert("RGB" if im.mode in ("P", "PA", "CMYK", "YCbCr") else "L")
                    array = np.asarray(im)
            loaded = Loaded(array, path, ext)
        else:
            raise BadRequest(
                f"unsupported image format '{ext}': use PNG, JPEG, TIFF, NIfTI (.nii/.nii.gz) or NRRD", 415
            )
    except BadRequest:
        raise
    except Image.DecompressionBombError:  # Pillow's own check, at open: far over the limit
        raise BadRequest(f"image {os.path.basename(path)} has more pixels than this server reads "
                         f"({MAX_PIXELS:,} at most)", 413) from None
    except Exception as e:  # each reader raises its own types for corrupt files; never show the server's paths
        reason = str(e).replace(os.path.dirname(path) + os.sep, "")
        raise BadRequest(f"cannot read image {os.path.basename(path)}: {reason}", 422) from None
    if loaded.is_volume:
        if loaded.array.ndim == 4 and loaded.array.shape[3] == 1:
            loaded.array = loaded.array[..., 0]
        if loaded.array.ndim == 2:
            loaded.array = loaded.array[..., None]
        if loaded.array.ndim != 3:
            raise BadRequest(f"volume {os.path.basename(path)} must be 3D, got shape {loaded.array.shape}", 422)
    if loaded.array.size == 0 or not np.issubdtype(loaded.array.dtype, np.number):
        raise BadRequest(f"image {os.path.basename(path)} is empty or not numeric", 422)
    if np.iscomplexobj(loaded.array):
        raise BadRequest(f"image {os.path.basename(path)} holds complex numbers; send real intensities", 422)
    if loaded.array.dtype.kind == "f" and not np.isfinite(loaded.array).all():
        raise BadRequest(f"image {os.path.basename(path)} holds NaN or infinite values", 422)
    if loaded.is_volume and not (np.isfinite(loaded.affine).all() and np.linalg.det(loaded.affine[:3, :3]) != 0):
        raise BadRequest(f"volume {os.path.basename(path)} has no valid geometry (its affine holds NaN, infinite "
                         "or zero spacing)", 422)
    return loaded


MAX_LABEL_NAME = 128  # characters of a label name


def is_label_name(name) -> bool:
    """A label name: printable text of at most ``MAX_LABEL_NAME`` characters, no '/' or '\\'."""
    return isinstance(name, str) and 0 < len(name) <= MAX_LABEL_NAME and name.isprintable() and \
        not any(c in name for c in "/\\")


def fill_polygon(ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int], budget: int) -> tuple[np.ndarray, int]:
    """The ``H W`` mask of the pixels whose centres lie inside the closed polygon (even-odd), by scanlines,
    and the number of (edge, row) crossings that cost: at most ``budget`` (422 beyond). Testing every pixel
    against every vertex (``skimage.draw.polygon``) froze the server for minutes on one large file."""
    h, w = shape
    mask = np.zeros(shape, bool)
    y0, x0, y1, x1 = ys, xs, np.roll(ys, -1), np.roll(xs, -1)
    keep = y0 != y1  # horizontal edges cross no scanline
    y0, x0, y1, x1 = y0[keep], x0[keep], y1[keep], x1[keep]
    # an edge crosses the rows r with min(y) <= r < max(y), half-open so that a vertex counts once
    lo = np.clip(np.ceil(np.minimum(y0, y1)), 0, h).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(y0, y1)), 0, h).astype(np.int64)
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    if total > budget:
        raise BadRequest(f"the ASAP polygons cross the rows of this {h} x {w} image more often than a label of "
                         "its size can (far too many or too large polygons)", 422)
    if total == 0:
        return mask, 0
    edge = np.repeat(np.arange(len(counts)), counts)
    rows = lo[edge] + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
    x = x0[edge] + (rows - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    order = np.lexsort((x, rows))
    rows, x = rows[order], x[order]
    start = np.clip(np.ceil(x[0::2]), 0, w).astype(np.int64)  # every row holds an even number of crossings
    stop = np.clip(np.floor(x[1::2]) + 1, 0, w).astype(np.int64)
    run = stop > start
    change = np.zeros((h, w + 1), np.int32)
    np.add.at(change, (rows[0::2][run], start[run]), 1)
    np.add.at(change, (rows[0::2][run], stop[run]), -1)
    return np.cumsum(change, axis=1)[:, :w] > 0, total


def read_asap(path: str, shape: tuple[int, int], default_name: str) -> dict[str, np.ndarray]:
    """ASAP XML polygons -> one ``H W`` mask per annotation group (``PartOfGroup``; an unclassified
    annotation, group ``None`` or none, is ``default_name``): the polygons of a group joined, each filled
    even-odd (a hole is a cut into its outline, as :func:`mvlabel.wsi.polygons` writes it). Raises 422 for
    what cannot be a label."""
    try:
        root = ET.parse(path).getroot()
    except Exception as e:
        raise BadRequest(f"cannot parse ASAP XML label: {e}", 422) from None
    masks: dict[str, np.ndarray] = {}
    budget = shape[0] * shape[1] + 100_000  # polygon crossings of the rows: a labelmap this size holds fewer
    for ann in root.iter("Annotation"):
        name = ann.get("PartOfGroup") or "None"
        name = default_name if name == "None" else name
        if not is_label_name(name):
            raise BadRequest(f"ASAP group {name[:MAX_LABEL_NAME]!r} is not a label name (at most {MAX_LABEL_NAME} "
                             "printable characters without '/' or '\\')", 422)
        try:
            pts = [(float(c.get("X", 0)), float(c.get("Y", 0))) for c in ann.iter("Coordinate")]
        except ValueError as e:
            raise BadRequest(f"ASAP annotation '{name}' has a coordinate that is not a number: {e}", 422) from None
        if not np.isfinite(pts).all():
            raise BadRequest(f"ASAP annotation '{name}' has a coordinate that is not finite", 422)
        mask = masks.setdefault(name, np.zeros(shape, bool))
        if len(masks) > MAX_LABELS:
            raise BadRequest(f"a label holds at most {MAX_LABELS} labels, this ASAP file has more groups", 422)
        if len(pts) >= 3:
            xs, ys = np.array(pts).T
            filled, crossings = fill_polygon(ys, xs, shape, budget)
            mask |= filled
            budget -= crossings
    return masks


MAX_LABELS = 16  # distinct label values one labelmap may hold


def check_label_values(label: np.ndarray) -> np.ndarray:
    """``label`` if its values are 0 (background) and at most ``MAX_LABELS`` of 1..255, else a 422."""
    values = np.unique(label)
    if values.min() < 0 or values.max() > 255:
        raise BadRequest(f"label values must be 0 (background) or 1..255, this label holds {values.min()} "
                         f"to {values.max()}", 422)
    labels = np.count_nonzero(values)
    if labels > MAX_LABELS:
        raise BadRequest(f"a label holds at most {MAX_LABELS} label values (1..255), this one has "
                         f"{labels} (min {values.min()}, max {values.max()})", 422)
    return label


def _has_geometry(loaded: Loaded) -> bool:
    """Whether a NIfTI or NRRD file says where its voxels are (not a bare array with a default affine)."""
    header = loaded.header
    if loaded.ext in NIFTI:
        return int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0
    return header is not None and (header.get("space directions") is not None or header.get("spacings") is not None)


def check_same_grid(label: Loaded, image: Loaded) -> None:
    """A volume label must be on the image's grid (422 otherwise): a label of the right shape but another voxel
    size, origin or orientation belongs to another image or was resampled. Within 1% of a voxel: float
    rounding of the headers. Either reader's placing of a NIfTI counts, nibabel's or ITK's (a label from Slicer
    has ITK's; they differ for a header without qform and sform, which nibabel centres and ITK puts at the
    origin, or with an sform of code 2-4 beside a qform). A label whose header does not place it (a NIfTI with
    neither qform nor sform, an NRRD without space directions or spacings) is taken in the image's voxel order."""
    if not (image.is_volume and label.is_volume and _has_geometry(label)):
        return
    placings = lambda x: [p for p in (x.affine, x.shown) if p is not None]  # noqa: E731 - nibabel's, ITK's
    for q in placings(image):
        voxel = float(np.linalg.norm(q[:3, :3], axis=0).min())
        if any(np.allclose(p, q, rtol=0, atol=0.01 * voxel) for p in placings(label)):
            return

    def describe(affine):
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        return (f"voxel size {' x '.join(f'{v:.4g}' for v in spacing)} mm, "
                f"origin ({', '.join(f'{v:.4g}' for v in affine[:3, 3])})")

    raise BadRequest(f"the label is not on the image's grid: the label has {describe(label.as_shown)}, the image "
                     f"{describe(image.as_shown)} (or another orientation); save the label in the image's "
                     "geometry", 422)


def read_label(path: str, like: Loaded) -> np.ndarray:
    """A labelmap on ``like``'s grid (integer array of ``like.shape``); shape or geometry mismatches raise 422."""
    ext = extension(path)
    if ext in (".jpg", ".jpeg"):
        raise BadRequest("a label must be stored losslessly (PNG, TIFF, NIfTI or NRRD): JPEG changes its values", 415)
    if ext in IMAGE_2D + NIFTI + NRRD:
        loaded = read_image(path, indices=True)
        label = loaded.array
        if label.ndim == 4 and label.shape[3] == 1:
            label = label[..., 0]
        if not like.is_volume and ext in NIFTI + NRRD:  # x first (W H [1]): Slicer's 2D label
            if label.ndim == 3 and label.shape[2] == 1:
                label = label[..., 0]
            label = label.T if label.ndim == 2 else label
        elif label.ndim == 3 and not like.is_volume:  # an RGB(A) PNG label: grey values only
            colour, alpha = label[..., :3], label[..., 3:]
            if (colour != colour[..., :1]).any() or (alpha.size and (alpha != alpha.flat[0]).any()):
                raise BadRequest("a colour label (channels that differ, or a varying alpha) cannot be read as "
                                 "label values: send a grey labelmap, one value per pixel", 422)
            label = label[..., 0]
    else:
        raise BadRequest(f"unsupported label format '{ext}'", 415)
    if tuple(label.shape) != like.shape:
        raise BadRequest(f"label has shape {tuple(label.shape)} but the image has shape {like.shape}", 422)
    check_same_grid(loaded, like)
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise BadRequest("label contains NaN or infinite values", 422)
        if not np.array_equal(label, np.rint(label)):
            raise BadRequest("label values must be whole numbers (0 = background, 1..255 = labels)", 422)
    return label.astype(np.int32)


def _suffix(like: Loaded, ext: Optional[str]) -> str:
    ext = (ext or "").lower()
    if ext and not ext.startswith("."):
        ext = "." + ext
    if not ext:
        return like.ext if like.ext in NIFTI + NRRD else ".png"
    if like.is_volume and ext not in NIFTI + NRRD:
        raise BadRequest(f"result_extension '{ext}' cannot hold a volume: use .nii.gz or .nrrd", 422)
    if not like.is_volume and ext not in NIFTI + NRRD + (".png", ".tif", ".tiff"):
        raise BadRequest(f"unsupported result_extension '{ext}'", 422)
    return ext


def write_label(
    mask: np.ndarray, like: Loaded, ext: Optional[str] = None, dtype: str = "uint8", compress: bool = True
) -> str:
    """Write ``mask`` (``like.shape``) to a temporary file in ``like``'s geometry; returns its path.

    ``compress=False`` (a client's ``result_compress: false``) writes NRRD raw and NIfTI as ``.nii``:
    OHIF copies the bytes straight into its labelmap. PNG and TIFF are written as they always are.
    """
    suffix = _suffix(like, ext)
    if not compress and suffix == ".nii.gz":
        suffix = ".nii"
    try:
        data = mask.astype(np.dtype(dtype or "uint8"))
    except TypeError:
        raise BadRequest(f"unknown result_dtype '{dtype}'", 422) from None
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="mvseg-")
    os.close(fd)
    try:
        _write_result(path, suffix, data, like, compress)
    except BaseException:  # a full temp folder: no half-written file left behind
        os.unlink(path)
        raise
    return path


def _write_result(path: str, suffix: str, data: np.ndarray, like: Loaded, compress: bool) -> None:
    if suffix in NIFTI + NRRD and not like.is_volume:
        data = data.T  # H W -> W H: x first, as a volume format holds a 2D image
    if suffix in NIFTI:
        header = like.header.copy() if isinstance(like.header, nib.Nifti1Header) else None
        img = nib.Nifti1Image(data if data.ndim >= 3 or like.is_volume else data[..., None], like.affine, header)
        img.set_data_dtype(data.dtype)
        nib.save(img, path)
    elif suffix in NRRD:
        # a NIfTI's answer in NRRD (Slicer's format) must lie where Slicer shows that image
        _write_nrrd(path, data, like.as_shown if like.is_volume else None, compress)
    else:
        Image.fromarray(data.astype(np.uint8) if data.dtype != np.uint16 else data).save(path)


_NRRD_TYPES = {"uint8": "uint8", "int8": "int8", "uint16": "uint16", "int16": "int16", "uint32": "uint32",
               "int32": "int32", "float32": "float", "float64": "double"}


def _write_nrrd(path: str, data: np.ndarray, affine: Optional[np.ndarray], compress: bool = True) -> None:
    """NRRD, gzip (level 1: label volumes are mostly zeros) or raw, in LPS space, which every reader takes.

    Written directly rather than through pynrrd: its Fortran-order copy dominated a click's write time.
    """
    if data.dtype.name not in _NRRD_TYPES:
        raise BadRequest(f"result_dtype {data.dtype} cannot be written as NRRD", 422)
    lines = ["NRRD0004", f"type: {_NRRD_TYPES[data.dtype.name]}", f"dimension: {data.ndim}",
             "sizes: " + " ".join(str(n) for n in data.shape), "encoding: " + ("gzip" if compress else "raw")]
    if data.dtype.itemsize > 1:
        lines.append("endian: little" if data.dtype.byteorder in "<=|" else "endian: big")
    if affine is not None and data.ndim == 3:
        lps = np.array(_TO_RAS["lps"], float)[:, None] * affine[:3]  # RAS -> LPS
        vec = lambda v: "(" + ",".join(f"{c:.17g}" for c in v) + ")"  # noqa: E731
        lines += ["space: left-posterior-superior",
                  "space directions: " + " ".join(vec(lps[:, i]) for i in range(3)),
                  "space origin: " + vec(lps[:, 3])]
    # NRRD's first axis varies fastest: Fortran order (a copy only when the array is C-ordered)
    raw = np.asfortranarray(data).tobytes(order="F")
    if compress:
        payload = zlib.compressobj(1, zlib.DEFLATED, 31)
        raw = payload.compress(raw) + payload.flush()
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n\n").encode())
        f.write(raw)


def write_asap(polygons: dict[str, list[np.ndarray]], colors: dict[str, str], path: Optional[str] = None) -> str:
    """``{group: [N 2 (x, y) arrays]}`` -> ASAP XML file (what QuPath's MONAI Label plugin reads)."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    for group, polys in polygons.items():
        for poly in polys:  # QuPath's plugin takes an annotation's class from its Name: the label's name
            a = ET.SubElement(anns, "Annotation", Name=group, Type="Polygon", PartOfGroup=group, Color=colors[group])
            coords = ET.SubElement(a, "Coordinates")
            for order, (x, y) in enumerate(poly):
                ET.SubElement(coords, "Coordinate", Order=str(order), X=f"{x:.1f}", Y=f"{y:.1f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    for group in polygons:
        g = ET.SubElement(groups, "Group", Name=group, PartOfGroup="None", Color=colors[group])
        ET.SubElement(g, "Attributes")
    if path is None:
        fd, path = tempfile.mkstemp(suffix=".xml", prefix="mvseg-")
        os.close(fd)
    try:
        ET.ElementTree(root).write(path, xml_declaration=True, encoding="utf-8")
    except BaseException:
        with suppress(OSError):
            os.unlink(path)
        raise
    return path


def is_upload(path) -> bool:
    """Whether ``path`` is a file this request uploaded: MONAI Label's routes write uploads to the temporary
    folder and put their absolute path in the request. Anything else is a datastore id, never a path,
    even when a file of that name happens to sit in the server's working folder."""
    return (isinstance(path, str) and os.path.isabs(path) and os.path.isfile(path)
            and os.path.dirname(os.path.realpath(path)) == os.path.realpath(tempfile.gettempdir()))


@contextmanager
def uploads_removed_when_refused(*paths):
    """Remove the request's uploads (MONAI Label's temp copies, :func:`is_upload`) when it fails: MONAI Label
    removes them only after a success."""
    try:
        yield
    except BaseException:
        for path in paths:
            if is_upload(path):
                with suppress(OSError):
                    os.unlink(path)
        raise


def stat_key(path: str) -> tuple:
    """What changes when a file is rewritten (freshness checks without reading it)."""
    st = Path(path).stat()
    return (st.st_mtime_ns, st.st_size)
