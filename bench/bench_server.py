"""Server benchmark: round trips of clicks and strokes over HTTP against a real ``monailabel start_server``.

    python -m bench.bench_server [--labels 0 16 64] [--clicks 20] [--weights PATH] [--conf refine false]

For each datastore size (final labels already saved), starts the server on loopback with the bundled
weights and replays clicks the way the clients send them: on a 512 x 512 PNG (2D; a stroke there too, as a
scribble labelmap) and on slices of a 256 x 256 x 95 NRRD volume (Slicer's 2D-model request: ``slice``, NRRD
uint8, whole volume back). Prints
p50/p95 of the round trip, of the network forward (as the server reports it) and of the difference (the
server's overhead: HTTP, reading, context, writing); with saved labels, the zero-click segmentation of the
whole volume (``multiverseg_auto``, every slice); then the first click after a ``PUT /datastore/label`` and
how many label files that save and click read. Data: ``../shared/datasets/hc18_fetal_head``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import nrrd
import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SLICES = 95  # the volume's depth
APP_DIR = ROOT / "apps" / "multiverseg"
HC18 = ROOT.parent / "shared" / "datasets" / "hc18_fetal_head"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(studies: Path, port: int, log: Path, conf: dict, timeout: float = 180,
                 env: dict | None = None) -> subprocess.Popen:
    """``monailabel start_server`` on loopback in its own process (``env``: extra environment, e.g. MONAI
    Label's settings); returns once ``/info/`` answers."""
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, str(value)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    return wait_until_answering(proc, f"http://127.0.0.1:{port}/info/", log, timeout)


def wait_until_answering(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> subprocess.Popen:
    """Poll ``url`` until the server ``proc`` answers it (any HTTP status); kill it after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc
        except urllib.error.HTTPError:  # it answers (401 when authentication is on)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    proc.wait(timeout=30)
    raise RuntimeError(f"{url}: no answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _resized(key: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    image = Image.open(HC18 / "images" / f"{key}.png").resize((side, side), Image.BILINEAR)
    mask = Image.open(HC18 / "masks" / f"{key}.png").resize((side, side), Image.NEAREST)
    return np.asarray(image), np.asarray(mask) > 0


def build_studies(folder: Path, n_labels: int) -> dict:
    """A datastore with a 2D target, a volume target and ``n_labels`` saved final labels (+1 spare image)."""
    keys = sorted(p.stem for p in (HC18 / "images").glob("*.png"))
    (folder / "labels" / "final").mkdir(parents=True)
    for key in keys[:n_labels]:
        shutil.copy(HC18 / "images" / f"{key}.png", folder / f"{key}.png")
        mask = np.asarray(Image.open(HC18 / "masks" / f"{key}.png")) > 0
        Image.fromarray(mask.astype(np.uint8)).save(folder / "labels" / "final" / f"{key}.png")
    image2d, mask2d = _resized(keys[-1], 512)
    Image.fromarray(image2d).save(folder / "target2d.png")
    slices = [_resized(k, 256) for k in keys[-SLICES - 1 : -1]]
    volume = np.stack([s[0] for s in slices], axis=2)
    nrrd.write(str(folder / "target3d.nrrd"), volume, {"space": "left-posterior-superior"}, index_order="F")
    spare = keys[-SLICES - 2]
    shutil.copy(HC18 / "images" / f"{spare}.png", folder / "spare.png")
    spare_mask = np.asarray(Image.open(HC18 / "masks" / f"{spare}.png")) > 0
    return {"mask2d": mask2d, "masks3d": np.stack([s[1] for s in slices], axis=2), "spare_mask": spare_mask}


def infer(
    url: str, image: str, params: dict, model: str = "multiverseg", files: dict | None = None
) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/infer/{model}?image={image}&output=all", data={"params": json.dumps(params)},
                      files=files)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    body = r.content
    start = body.find(b"{")
    info = json.loads(body[start : body.find(b"\r\n", start)])
    return elapsed, info


def click_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> list[list[int]]:
    ys, xs = np.nonzero(mask)
    pick = rng.choice(len(xs), size=n)
    return [[int(xs[i]), int(ys[i])] for i in pick]


def stroke_png(mask: np.ndarray) -> bytes:
    """A horizontal stroke through the middle of ``mask``'s object, as a scribble labelmap PNG."""
    ys, xs = np.nonzero(mask)
    row = int(np.median(ys))
    cols = np.flatnonzero(mask[row])
    labelmap = np.zeros(mask.shape, np.uint8)
    labelmap[row - 1 : row + 2, cols[len(cols) // 4] : cols[3 * len(cols) // 4]] = 3
    buf = io.BytesIO()
    Image.fromarray(labelmap).save(buf, "PNG")
    return buf.getvalue()


def run(n_labels: int, clicks: int, conf: dict) -> list[dict]:
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="mvseg-bench-"))
    data = build_studies(work / "studies", n_labels)
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(work / "studies", port, work / "server.log", conf)
    startup = time.perf_counter() - t0
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        # 2D: each click adds to the last (a refinement), as an annotator works
        fg = click_points(data["mask2d"], clicks + 1, rng)
        stroke = stroke_png(data["mask2d"])
        infer(url, "target2d", {"foreground": fg[:1], "client_id": "warm"})  # first request: lazy imports
        times = [infer(url, "target2d", {"foreground": fg[: i + 1], "client_id": "bench"}) for i in range(clicks)]
        rows.append(summary("2D 512x512", n_labels, times))
        # 2D: a stroke across the object (a scribble labelmap, 3 = foreground); without saved labels the
        # server also takes its closer look at the stroke's window (mvseg.zoom)
        times = [infer(url, "target2d", {"client_id": f"stroke{i}"}, files={"label": ("s.png", stroke, "image/png")})
                 for i in range(clicks)]
        rows.append(summary("2D 512x512, a stroke", n_labels, times))
        # 3D: Slicer's request for a 2D model, clicks on consecutive slices
        masks = data["masks3d"]
        times = []
        for i in range(clicks):
            k = 10 + i % 40
            ii, jj = np.nonzero(masks[:, :, k])
            j = rng.integers(len(ii))
            params = {"foreground": [[int(ii[j]), int(jj[j]), k]], "slice": k, "result_extension": ".nrrd",
                      "result_dtype": "uint8", "client_id": "bench3d"}
            times.append(infer(url, "target3d", params))
        rows.append(summary(f"3D slice of 256x256x{SLICES}", n_labels, times))
        if n_labels:  # zero-click needs saved labels to learn from
            elapsed, info = infer(url, "target3d", {"label_name": "head", "result_extension": ".nrrd"},
                                  "multiverseg_auto")
            rows.append({"case": f"zero-click volume, {SLICES} slices", "labels": n_labels, "rtt_s": elapsed,
                         "infer_s": info["latencies"]["infer"], "context": info["context_size"]})
        # a save, then the first click
        Image.fromarray(data["spare_mask"].astype(np.uint8)).save(work / "spare_label.png")
        t0 = time.perf_counter()
        with (work / "spare_label.png").open("rb") as f:
            r = requests.put(f"{url}/datastore/label?image=spare&tag=final", files={"label": ("l.png", f)},
                             data={"params": "{}"})
        r.raise_for_status()
        save_s = time.perf_counter() - t0
        before = times[-1][1]["labels_read_total"]
        elapsed, info = infer(url, "target2d", {"foreground": fg[:1], "client_id": "after-save"})
        rows.append({"case": "first 2D click after a save", "labels": n_labels, "save_ms": save_s * 1e3,
                     "rtt_ms": elapsed * 1e3, "infer_ms": info["latencies"]["infer"] * 1e3,
                     "labels_read": info["labels_read_total"] - before, "context": info["context_size"],
                     "startup_s": startup})
        # a stroke judges the context (its reliability, unless the scoring pass has it already for this save)
        elapsed, info = infer(url, "target2d", {"client_id": "stroke-after-save"},
                              files={"label": ("s.png", stroke, "image/png")})
        rows.append({"case": "first stroke after the save", "labels": n_labels, "rtt_ms": elapsed * 1e3,
                     "context_s": info["latencies"]["context"], "reliability": info["context_reliability"],
                     "context": info["context_size"]})
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def summary(case: str, n_labels: int, times: list) -> dict:
    rtt = np.array([t for t, _ in times]) * 1e3
    net = np.array([info["latencies"]["infer"] for _, info in times]) * 1e3
    over = rtt - net
    return {"case": case, "labels": n_labels, "context": times[-1][1]["context_size"],
            "rtt_p50": np.percentile(rtt, 50), "rtt_p95": np.percentile(rtt, 95),
            "net_p50": np.percentile(net, 50), "net_p95": np.percentile(net, 95),
            "over_p50": np.percentile(over, 50), "over_p95": np.percentile(over, 95)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[0, 16, 64])
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--weights", help="checkpoint (default: the bundled weights)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="one more app setting for the server, e.g. --conf refine false; repeatable")
    args = parser.parse_args(argv)
    conf = {"labels": "head", "device": "cpu", **dict(args.conf)}
    if args.weights:
        conf["weights"] = args.weights
    rows = [row for n in args.labels for row in run(n, args.clicks, conf)]
    print("| case | labels | context | round trip p50 / p95 | network p50 / p95 | overhead p50 / p95 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "rtt_p50" in r:
            print(f"| {r['case']} | {r['labels']} | {r['context']} | {r['rtt_p50']:.0f} / {r['rtt_p95']:.0f} ms | "
                  f"{r['net_p50']:.0f} / {r['net_p95']:.0f} ms | {r['over_p50']:.1f} / {r['over_p95']:.1f} ms |")
    print()
    for r in rows:
        if "rtt_s" in r:
            print(f"labels={r['labels']}: {r['case']}: {r['rtt_s']:.1f} s round trip, network {r['infer_s']:.1f} s "
                  f"({1e3 * r['infer_s'] / SLICES:.0f} ms per slice, context {r['context']})")
    for r in rows:
        if "save_ms" in r:
            print(f"labels={r['labels']}: server start {r['startup_s']:.1f} s; PUT label {r['save_ms']:.0f} ms; "
                  f"first click after it {r['rtt_ms']:.0f} ms (network {r['infer_ms']:.0f} ms, context "
                  f"{r['context']}); label files read by save + click: {r['labels_read']}")
    for r in rows:
        if "reliability" in r:
            judged = "not judged" if r["reliability"] is None else f"reliability {r['reliability']}"
            print(f"labels={r['labels']}: first stroke after the save {r['rtt_ms']:.0f} ms (context step "
                  f"{1e3 * r['context_s']:.0f} ms, {judged}, context {r['context']})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
