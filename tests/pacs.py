"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on a free loopback port.

``.ci/run`` installs it (``apt-get install orthanc orthanc-dicomweb``); :func:`start_orthanc` writes a
config into a temp dir, starts ``/usr/sbin/Orthanc`` on it and waits (bounded) until DICOMweb answers;
:func:`stop_process` stops it by its PID. Also usable by hand: ``python -m tests.pacs DIR`` starts one
with the sample series uploaded and prints its DICOMweb URL.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.bench_server import wait_until_answering

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_available() -> bool:
    return Path(ORTHANC).exists() and Path(DICOMWEB_PLUGIN).exists()


def start_orthanc(folder: Path, port: int, timeout: float = 60) -> subprocess.Popen:
    """Orthanc storing into ``folder``, DICOMweb at ``http://127.0.0.1:PORT/dicom-web``; returns once it answers."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "mvseg-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = folder / "orthanc.log"
    proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log.open("w"), stderr=subprocess.STDOUT)
    return wait_until_answering(proc, f"http://127.0.0.1:{port}/dicom-web/studies", log, timeout)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then wait (Orthanc takes a few seconds to exit), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def upload(url: str, files: list[Path]) -> None:
    """STOW-RS of DICOM files to a DICOMweb root."""
    import pydicom
    from dicomweb_client import DICOMwebClient

    DICOMwebClient(url).store_instances([pydicom.dcmread(str(f)) for f in files])


def main(argv=None) -> None:
    import importlib.util

    folder = Path((argv or sys.argv[1:] or ["/tmp/mvseg-orthanc"])[0])
    port = 8042
    shutil.rmtree(folder, ignore_errors=True)
    proc = start_orthanc(folder, port)
    spec = importlib.util.spec_from_file_location("make_dicom", Path(__file__).parents[1] / "sample-datasets" / "make_dicom.py")
    make_dicom = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_dicom)
    upload(f"http://127.0.0.1:{port}/dicom-web", make_dicom.write_series(make_dicom.SAMPLE, folder / "series"))
    print(f"Orthanc PID {proc.pid}: http://127.0.0.1:{port}/dicom-web")


if __name__ == "__main__":
    main()
