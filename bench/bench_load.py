"""Load benchmark: several annotators on one server while a zero-click volume runs.

    python -m bench.bench_load [--annotators 8] [--clicks 12] [--think 1.0] [--labels 16]

Starts ``monailabel start_server`` on loopback (bundled weights) on a datastore of hc18 images with
``--labels`` saved final labels and a 256 x 256 x 64 volume. First one annotator clicks alone (the
baseline); then, in one run, ``--annotators`` simulated annotators each click ``--clicks`` times on an
image of their own (a pause of about ``--think`` seconds between clicks, as a person looks at the result)
and save it as final, while ``multiverseg_auto`` segments the volume and a monitor asks ``/info/`` every
100 ms. Prints click p50/p95 alone and under load, ``/info/`` p95, errors, and whether every saved label
file is byte-identical to what its annotator sent.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from .bench_server import HC18, build_studies, click_points, free_port, start_server, stop


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Annotator(threading.Thread):
    def __init__(self, url: str, image: str, mask: np.ndarray, clicks: int, think: float, seed: int):
        super().__init__(daemon=True)
        self.url, self.image, self.mask, self.clicks, self.think = url, image, mask, clicks, think
        self.rng = np.random.default_rng(seed)
        self.times: list[float] = []
        self.network: list[float] = []  # the server's own time for the forward, waiting for the model included
        self.errors: list[str] = []
        self.sent = _png(mask)

    def run(self) -> None:
        points = click_points(self.mask, self.clicks, self.rng)
        session = requests.Session()
        time.sleep(self.think * self.rng.uniform(0, 1))  # people do not start on the same millisecond
        for i in range(self.clicks):
            params = {"foreground": points[: i + 1], "client_id": f"annotator-{self.image}"}
            t0 = time.perf_counter()
            try:
                r = session.post(f"{self.url}/infer/multiverseg?image={self.image}&output=json",
                                 data={"params": json.dumps(params)}, timeout=120)
                if r.status_code != 200:
                    self.errors.append(f"click {r.status_code}: {r.text[:120]}")
                else:
                    self.network.append(r.json()["latencies"]["infer"])
            except requests.RequestException as e:
                self.errors.append(f"click: {e}")
            self.times.append(time.perf_counter() - t0)
            time.sleep(self.think * self.rng.uniform(0.5, 1.5))
        r = session.put(f"{self.url}/datastore/label?image={self.image}&tag=final", data={"params": "{}"},
                        files={"label": ("label.png", self.sent, "image/png")}, timeout=120)
        if r.status_code != 200:
            self.errors.append(f"save {r.status_code}: {r.text[:120]}")


def monitor_info(url: str, stop_event: threading.Event, times: list, errors: list) -> None:
    session = requests.Session()
    while not stop_event.is_set():
        t0 = time.perf_counter()
        try:
            if session.get(f"{url}/info/", timeout=30).status_code != 200:
                errors.append("info")
        except requests.RequestException as e:
            errors.append(f"info: {e}")
        times.append(time.perf_counter() - t0)
        time.sleep(0.1)


def run(annotators: int, clicks: int, think: float, labels: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mvseg-load-"))
    studies = work / "studies"
    build_studies(studies, labels)
    keys = sorted(p.stem for p in (HC18 / "images").glob("*.png"))[labels : labels + annotators + 1]
    for key in keys:
        shutil.copy(HC18 / "images" / f"{key}.png", studies / f"{key}.png")
    masks = {k: np.asarray(Image.open(HC18 / "masks" / f"{k}.png")) > 0 for k in keys}
    port = free_port()
    proc = start_server(studies, port, work / "server.log", {"labels": "head", "device": "cpu"})
    url = f"http://127.0.0.1:{port}"
    try:
        alone = Annotator(url, keys[0], masks[keys[0]], clicks, think, 0)
        alone.run()  # in this thread: nothing else running
        crowd = [Annotator(url, k, masks[k], clicks, think, i + 1) for i, k in enumerate(keys[1:])]
        info_times, info_errors, done = [], [], threading.Event()
        watcher = threading.Thread(target=monitor_info, args=(url, done, info_times, info_errors), daemon=True)
        auto: dict = {}

        def zero_click_volume():
            t0 = time.perf_counter()
            r = requests.post(f"{url}/infer/multiverseg_auto?image=target3d&output=json",
                              data={"params": "{}"}, timeout=600)
            auto.update(status=r.status_code, seconds=time.perf_counter() - t0)

        volume = threading.Thread(target=zero_click_volume, daemon=True)
        watcher.start()
        volume.start()
        time.sleep(0.5)  # the volume is under way before the crowd starts
        for a in crowd:
            a.start()
        for a in crowd:
            a.join(600)
        volume.join(600)
        done.set()
        watcher.join(30)
        saved_ok = sum((studies / "labels" / "final" / f"{a.image}.png").read_bytes() == a.sent
                       for a in [alone] + crowd)
        crowd_times = [t for a in crowd for t in a.times]
        crowd_network = [t for a in crowd for t in a.network]
        return {
            "annotators": annotators, "clicks": clicks, "think_s": think, "labels": labels,
            "alone_p50": np.percentile(alone.times, 50) * 1e3, "alone_p95": np.percentile(alone.times, 95) * 1e3,
            "crowd_p50": np.percentile(crowd_times, 50) * 1e3, "crowd_p95": np.percentile(crowd_times, 95) * 1e3,
            "alone_net_p95": np.percentile(alone.network, 95) * 1e3,
            "crowd_net_p50": np.percentile(crowd_network, 50) * 1e3,
            "crowd_net_p95": np.percentile(crowd_network, 95) * 1e3,
            "info_p95": np.percentile(info_times, 95) * 1e3, "info_max": max(info_times) * 1e3,
            "info_n": len(info_times), "auto": auto,
            "errors": alone.errors + [e for a in crowd for e in a.errors] + info_errors,
            "labels_identical": f"{saved_ok}/{1 + len(crowd)}",
        }
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--clicks", type=int, default=12)
    parser.add_argument("--think", type=float, default=1.0, help="mean seconds between an annotator's clicks")
    parser.add_argument("--labels", type=int, default=16, help="final labels saved before the run")
    args = parser.parse_args(argv)
    r = run(args.annotators, args.clicks, args.think, args.labels)
    print(f"{r['annotators']} annotators x {r['clicks']} clicks (think ~{r['think_s']} s), context {r['labels']}, "
          f"multiverseg_auto on 256x256x64 meanwhile ({r['auto'].get('status')}, {r['auto'].get('seconds', 0):.1f} s)")
    print(f"click alone:      p50 {r['alone_p50']:.0f} ms, p95 {r['alone_p95']:.0f} ms")
    print(f"click under load: p50 {r['crowd_p50']:.0f} ms, p95 {r['crowd_p95']:.0f} ms "
          f"(p95 x{r['crowd_p95'] / r['alone_p95']:.2f} of alone)")
    print(f"  of which the model (waiting for it included): alone p95 {r['alone_net_p95']:.0f} ms, under load "
          f"p50 {r['crowd_net_p50']:.0f} ms, p95 {r['crowd_net_p95']:.0f} ms")
    print(f"/info/: p95 {r['info_p95']:.0f} ms, max {r['info_max']:.0f} ms over {r['info_n']} requests")
    print(f"errors: {len(r['errors'])} {r['errors'][:3]}; saved labels byte-identical: {r['labels_identical']}")


if __name__ == "__main__":
    main()
