"""The bundled OHIF viewer at ``/ohif/``, with its nested assets served as what they are.

MONAI Label 0.8.5 joins the request path with ``os.pathsep`` (``":"`` on Linux) where it means ``os.sep``,
so every nested file (``/ohif/assets/...``) misses and the viewer gets ``index.html`` instead of its
scripts. Its route looks ``get_ohif`` up in its module at request time, so the app replaces that function
(no patched copy of MONAI Label). Paths stay inside the OHIF folder; unknown ones get the viewer's
``index.html`` (the single-page app routes them), as before.
"""

from __future__ import annotations

import os

from fastapi import HTTPException
from fastapi.responses import FileResponse

OHIF_DIR = None  # set by serve_ohif_assets: MONAI Label's static/ohif folder


def get_ohif(path: str) -> FileResponse:
    root = os.path.realpath(OHIF_DIR)
    file = os.path.join(root, "index.html")
    if "\0" in path:  # no file name holds one (os.path would raise)
        raise HTTPException(status_code=404, detail="not an OHIF file")
    if path:
        candidate = os.path.realpath(os.path.join(root, path))
        inside = candidate.startswith(root + os.sep)
        if inside and os.path.isfile(candidate):
            file = candidate
        elif not inside:
            raise HTTPException(status_code=404, detail="not an OHIF file")
    if not os.path.isfile(file):
        raise HTTPException(status_code=404, detail="the OHIF viewer is not installed with this MONAI Label")
    from monailabel.utils.others.generic import get_mime_type

    return FileResponse(file, media_type=get_mime_type(file))


def serve_ohif_assets() -> None:
    """Put :func:`get_ohif` in place of MONAI Label's own."""
    global OHIF_DIR
    import monailabel.endpoints.ohif as endpoint

    OHIF_DIR = os.path.join(os.path.dirname(os.path.realpath(endpoint.__file__)), "static", "ohif")
    endpoint.get_ohif = get_ohif
