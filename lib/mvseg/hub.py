"""The official released checkpoints, one name away: downloaded once into a cache, verified, reused.

    python -m mvseg.hub multiverseg-v1          # or: Predictor("multiverseg-v1"), --conf weights multiverseg-v1

Names map to the files the official MultiverSeg repository publishes (its ``checkpoints/download.sh``).
A download goes to a temporary file beside the cache entry (progress bar), must load strictly as the
network the name promises (:func:`mvseg.load_checkpoint`), then is renamed into place with its sha256
written beside it; a later use checks the file against that digest, so a damaged cache is fetched again,
never loaded. ``sha256`` pins a digest the file must have. Nothing is fetched unless a name is asked for.

Cache: ``$MVSEG_CACHE`` or ``~/.cache/mvseg``. Mirror: ``$MVSEG_WEIGHTS_MIRROR`` (a base URL under which
the files keep their release names), for servers that reach an internal mirror only.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .checkpoint import MULTIVERSEG, SCRIBBLEPROMPT, CheckpointError, load_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    file: str
    url: str
    kind: str  # the network the file must hold


RELEASES = {
    "multiverseg-v1": Release(
        "MultiverSeg_v1_nf256_res128.pt",
        "https://www.dropbox.com/scl/fi/pcf7kgz87bqfrathbri63/MultiverSeg_v1_nf256_res128.pt"
        "?rlkey=j646jh2b1wocvptpeascrzrt0&dl=1",
        MULTIVERSEG,
    ),
    "scribbleprompt-v1": Release(
        "ScribblePrompt_unet_v1_nf192_res128.pt",
        "https://www.dropbox.com/scl/fi/pnw88n05irnv5z1snlklr/ScribblePrompt_unet_v1_nf192_res128.pt"
        "?rlkey=dr8xvkf0wj2r082h1zzpcmz5o&dl=1",
        SCRIBBLEPROMPT,
    ),
}


MAX_DOWNLOAD_BYTES = 1 << 30  # the official files are under 100 MB
MAX_DOWNLOAD_SECONDS = 3600  # a whole download, however slowly it trickles in


def cache_dir() -> Path:
    return Path(os.environ.get("MVSEG_CACHE") or Path.home() / ".cache" / "mvseg")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str, sha256: Optional[str] = None, timeout: float = 60.0, progress: bool = True) -> Path:
    """The cached file of release ``name``, downloaded first when missing or damaged."""
    if name not in RELEASES:
        raise ValueError(f"unknown release '{name}'; known: {', '.join(RELEASES)}")
    release = RELEASES[name]
    folder = cache_dir()
    target = folder / release.file
    stamp = target.with_name(target.name + ".sha256")
    if target.exists() and stamp.exists():
        digest = _sha256(target)
        if digest == stamp.read_text().strip() and sha256 in (None, digest):
            return target
        log.warning("%s in the cache does not match its digest: fetching it again", target)
    elif target.exists() and sha256 is None:  # put there by hand (a machine without internet): checked, kept
        _check_kind(target, release, str(folder))
        stamp.write_text(_sha256(target) + "\n")
        log.info("%s: %s, placed in the cache by hand", name, target)
        return target
    mirror = os.environ.get("MVSEG_WEIGHTS_MIRROR")
    url = f"{mirror.rstrip('/')}/{release.file}" if mirror else release.url
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{release.file}.*.part"):  # left by a download that was killed
        if time.time() - stale.stat().st_mtime > timeout + MAX_DOWNLOAD_SECONDS:
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{release.file}.", suffix=".part", dir=folder)
    os.fchmod(fd, 0o644)  # a shared cache: readable by the other users of the machine
    try:
        try:
            received, total = _download(url, fd, release.file, timeout, progress)
        except OSError as e:  # no network, a name that does not resolve, a refused or timed-out connection
            raise CheckpointError(f"cannot download {release.file} from {url} ({getattr(e, 'reason', e)}): on a "
                                  f"machine without internet, put the file in {folder} or name a mirror in "
                                  "MVSEG_WEIGHTS_MIRROR") from None
        if total is not None and received != total:
            raise CheckpointError(f"download of {url} was cut short: {received:,} of {total:,} bytes")
        digest = _sha256(Path(tmp))
        if sha256 is not None and digest != sha256:
            raise CheckpointError(f"{release.file} from {url} has sha256 {digest}, expected {sha256}")
        _check_kind(tmp, release, url)
        os.replace(tmp, target)
        stamp.write_text(digest + "\n")
        log.info("%s: %s (sha256 %s)", name, target, digest)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download(url: str, fd: int, name: str, timeout: float, progress: bool) -> tuple[int, Optional[int]]:
    """Write what ``url`` answers to ``fd`` (closed after); (bytes received, bytes announced or None)."""
    started = time.monotonic()
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        if total is not None and total > MAX_DOWNLOAD_BYTES:
            raise CheckpointError(f"{url} announces {total:,} bytes: no release is that large")
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                if received > MAX_DOWNLOAD_BYTES or time.monotonic() - started > MAX_DOWNLOAD_SECONDS:
                    raise CheckpointError(f"download of {url} stopped: over {MAX_DOWNLOAD_BYTES:,} bytes or "
                                          f"{MAX_DOWNLOAD_SECONDS} s")
    return received, total


def _check_kind(path, release, source: str) -> None:
    model = load_checkpoint(path)  # loads strictly, or says what does not fit
    if model.kind != release.kind:
        raise CheckpointError(f"{release.file} from {source} holds a '{model.kind}' network, not '{release.kind}'")


def resolve(weights: Optional[str]) -> Optional[str]:
    """A release name becomes its cached file (fetched if needed); paths and None pass through."""
    return str(fetch(weights)) if weights in RELEASES else weights


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mvseg.hub", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(RELEASES))
    parser.add_argument("--sha256", help="the digest the file must have")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(fetch(args.name, args.sha256))
    except CheckpointError as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
