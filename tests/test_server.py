"""The real server: ``monailabel start_server`` on a loopback port, driven by MONAI Label's Python client
(the client the Slicer plugin carries), through a full annotation loop with the bundled weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from mvseg.evaluate import dice
from mvseg.interaction import CenterClicks

from bench.bench_server import free_port, start_server, stop

from .app_helpers import HC18, hc18_pair
from .conftest import ROOT

pytestmark = pytest.mark.slow

HELD_OUT = ROOT / "lib" / "mvseg" / "weights" / "multiverseg_default.split.json"


def held_out_ids(n: int) -> list[str]:
    import json

    split = json.loads(HELD_OUT.read_text())
    return sorted(split["hc18_fetal_head/all"]["heldout"])[:n]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    studies = root / "studies"
    studies.mkdir()
    ids = held_out_ids(8)
    for key in ids:
        shutil.copy(HC18 / "images" / f"{key}.png", studies / f"{key}.png")
    port = free_port()
    # trust 0.5 (bundled: 0.75): four labels of these images reach it, the bundled threshold takes more
    proc = start_server(studies, port, root / "server.log", {"labels": "head", "trust": "0.5"})
    try:
        yield f"http://127.0.0.1:{port}", ids, root
    finally:
        stop(proc)


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 0


def test_annotation_loop_context_grows_and_zero_click_improves(live):
    from monailabel.client import MONAILabelClient

    url, ids, root = live
    client = MONAILabelClient(url, tmpdir=str(root), client_id="annotator")
    assert "multiverseg" in client.info()["models"]
    probes = ids[-3:]  # never labelled: measured zero-click as the context grows
    protocol = CenterClicks()

    def zero_click() -> tuple[float, int, float]:
        """Mean Dice of the probes' zero-click answers, the context size and reliability they report."""
        scores, size, reliability = [], 0, 0.0
        for key in probes:
            path, params = client.infer("multiverseg", key, {"label_name": "head"})
            scores.append(dice(read_png(path), hc18_pair(key)[1]))
            size, reliability = params["context_size"], params["context_reliability"]
        return float(np.mean(scores)), size, reliability

    history = []
    for _ in range(4):
        sample = client.next_sample("first", {})["id"]
        assert sample not in probes
        truth = hc18_pair(sample)[1]
        prompts, _ = protocol.first(truth)
        for _ in range(6):  # the annotator clicks until the mask is good
            path, params = client.infer(
                "multiverseg", sample,
                {"foreground": [list(p) for p in prompts.positive], "background": [list(p) for p in prompts.negative]},
            )
            mask = read_png(path)
            if dice(mask, truth) >= 0.9:
                break
            prompts, n = protocol.correct(truth, mask, prompts)
            if n == 0:
                break
        Image.fromarray(mask.astype(np.uint8)).save(root / "final.png")
        client.save_label(sample, str(root / "final.png"), tag="final")
        history.append(zero_click())

    # a proposal once the context segments its own images well enough (--conf trust); none before
    assert history[0] == (0.0, 0, 0.0), history  # one label: nothing to measure the context by
    for saved, (score, size, reliability) in enumerate(history, start=1):
        assert (size, score > 0.5) == ((saved, True) if reliability >= 0.5 else (0, False)), history
    assert history[-1][2] > history[1][2] and history[-1][1] == 4, history
