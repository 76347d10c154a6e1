"""The MONAI Label app through its REST API (TestClient with the lifespan), with each client's request shapes."""

from __future__ import annotations

import io
import json
import time
import xml.etree.ElementTree as ET

import nibabel as nib
import nrrd
import numpy as np
import pytest
from PIL import Image


from .app_helpers import (
    APP_DIR, app_client, hc18_ids, hc18_pair, make_studies, png_bytes, save_tiny_weights, split_multipart,
)

IDS = hc18_ids(6)
VOLUME_IDS = hc18_ids(5, start=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(client, app instance, studies dir) on a datastore of 6 PNGs and two volumes, with tiny weights."""
    root = tmp_path_factory.mktemp("app")
    studies = make_studies(root / "studies", IDS, VOLUME_IDS)
    with app_client(studies, {"labels": "head"}) as (client, app):
        yield client, app, studies


def infer(client, model, image, params, output="json", files=None):
    url = f"/infer/{model}?image={image}&output={output}"
    return client.post(url, data={"params": json.dumps(params)}, files=files)


def save_final(client, image, mask: np.ndarray, label_info=None, name="label.png"):
    params = {"label_info": label_info} if label_info else {}
    return client.put(
        f"/datastore/label?image={image}&tag=final",
        data={"params": json.dumps(params)},
        files={"label": (name, png_bytes(mask.astype(np.uint8)), "application/octet-stream")},
    )


def final_label_bytes(studies, image_id):
    return (studies / "labels" / "final" / f"{image_id}.png").read_bytes()


def ensure_final(client, studies) -> bytes:
    """The saved final label of ``IDS[0]``, saved first when the tests that save it did not run (``-k``)."""
    if not (studies / "labels" / "final" / f"{IDS[0]}.png").exists():
        assert save_final(client, IDS[0], hc18_pair(IDS[0])[1]).status_code == 200
    return final_label_bytes(studies, IDS[0])


# -- info and the interactive loop on 2D images --------------------------------------------------------


def test_info_lists_both_models(server):
    client, _, _ = server
    info = client.get("/info/").json()
    assert info["models"]["multiverseg"]["type"] == "deepgrow"
    assert info["models"]["multiverseg"]["dimension"] == 2
    assert info["models"]["multiverseg"]["nuclick"] is True
    assert info["models"]["multiverseg_auto"]["type"] == "segmentation"
    assert info["labels"] == ["head"]
    assert {"random", "first"} <= set(info["strategies"])


def test_auto_before_any_saved_label_is_409_with_a_message(server):
    client, app, _ = server
    assert not any(app.context.sizes().values())  # runs before the tests below save labels
    r = infer(client, "multiverseg_auto", IDS[0], {})
    assert r.status_code == 409 and "no saved" in r.text


def test_click_returns_mask_on_the_image_grid(server):
    client, _, _ = server
    image, mask = hc18_pair(IDS[0])
    ys, xs = np.nonzero(mask)
    params = {"foreground": [[int(xs.mean()), int(ys.mean())]], "client_id": "a"}
    r = infer(client, "multiverseg", IDS[0], params, "all")
    assert r.status_code == 200, r.text
    params, body = split_multipart(r)
    assert params["label_names"] == {"head": 1}
    assert "context_size" in params and "context_version" in params
    result = np.asarray(Image.open(io.BytesIO(body)))
    assert result.shape == image.shape[:2]
    assert set(np.unique(result)) <= {0, 1}


def test_more_clicks_refine_the_previous_prediction(server):
    client, _, _ = server
    _, mask = hc18_pair(IDS[1])
    ys, xs = np.nonzero(mask)
    first = [[int(xs.mean()), int(ys.mean())]]
    r1 = infer(client, "multiverseg", IDS[1], {"foreground": first, "client_id": "b"}).json()
    r2 = infer(client, "multiverseg", IDS[1], {"foreground": first, "background": [[2, 2]], "client_id": "b"}).json()
    r3 = infer(client, "multiverseg", IDS[1], {"foreground": first, "client_id": "b"}).json()  # a click removed
    assert r1["refined"] is False and r2["refined"] is True and r3["refined"] is False
    r4 = infer(client, "multiverseg", IDS[1], {"foreground": first, "background": [[2, 2]], "client_id": "b",
                                                 "reset_state": True}).json()
    assert r4["refined"] is False


def test_saving_final_labels_grows_the_context_reading_only_the_new_label(server):
    client, app, studies = server
    before = infer(client, "multiverseg", IDS[2], {"foreground": [[100, 100]]}).json()
    reads = app.context.reads
    _, mask = hc18_pair(IDS[0])
    r = save_final(client, IDS[0], mask)
    assert r.status_code == 200, r.text
    assert app.context.reads == reads + 1  # on_save_label read just this one
    after = infer(client, "multiverseg", IDS[2], {"foreground": [[100, 100]]}).json()
    assert after["context_size"] == before["context_size"] + 1
    assert after["context_version"] > before["context_version"]
    assert app.context.reads == reads + 1  # the freshness check found nothing else to read


def test_labels_saved_behind_the_hook_are_picked_up(server):
    client, app, studies = server
    before = infer(client, "multiverseg", IDS[3], {"foreground": [[90, 90]]}).json()["context_size"]
    _, mask = hc18_pair(IDS[4])
    tmp = studies.parent / "behind.png"
    Image.fromarray(mask.astype(np.uint8)).save(tmp)
    app.datastore().save_label(IDS[4], str(tmp), "final", {})  # as infer(save_label)/batch jobs do: no hook
    after = infer(client, "multiverseg", IDS[3], {"foreground": [[90, 90]]}).json()["context_size"]
    assert after == before + 1


def test_label_info_names_the_context_set(server):
    client, app, _ = server
    _, mask = hc18_pair(IDS[5])
    r = save_final(client, IDS[5], mask.astype(np.uint8) * 2, label_info=[{"name": "skull", "idx": 2}])
    assert r.status_code == 200, r.text
    assert app.context.sizes().get("skull") == 1
    r = infer(client, "multiverseg", IDS[3], {"foreground": [[90, 90]], "label": "skull"}).json()
    assert r["label_names"] == {"skull": 1} and r["context_size"] == 1


def test_a_context_the_predictor_does_not_trust_gives_no_proposal(server, monkeypatch):
    """Below ``--conf trust`` a zero-click request gets an empty mask (no proposal from a context that does
    not segment its own images well), scribbles go without the context, clicks still use it; the answer
    says how reliable the context was."""
    client, app, studies = server
    ensure_final(client, studies)
    monkeypatch.setattr(app.predictor, "trust", 1.0)  # no context segments itself perfectly
    proposal = infer(client, "multiverseg", IDS[3], {"client_id": "t"}, "all")
    params, body = split_multipart(proposal)
    assert params["context_size"] == 0 and params["network"] == "none"
    assert 0.0 <= params["context_reliability"] < 1.0 and params["context_version"] == app.context.get("head").version
    assert not np.asarray(Image.open(io.BytesIO(body))).any()
    scribbles = np.zeros(hc18_pair(IDS[3])[1].shape, np.uint8)
    scribbles[80:100, 80:100] = 3  # MONAI Label's foreground scribble value
    files = {"label": ("s.png", png_bytes(scribbles), "application/octet-stream")}
    drawn = infer(client, "multiverseg", IDS[3], {"client_id": "t"}, files=files).json()
    assert drawn["context_size"] == 0
    infer(client, "multiverseg", IDS[3], {"client_id": "t2"})  # nothing shown: the click starts afresh
    click = {"foreground": [[90, 90]]}
    clicked, body = split_multipart(infer(client, "multiverseg", IDS[3], {**click, "client_id": "t2"}, "all"))
    fresh, fresh_body = split_multipart(infer(client, "multiverseg", IDS[3], {**click, "client_id": "t3"}, "all"))
    assert clicked["context_size"] >= 1 and clicked["refined"] is False and body == fresh_body
    monkeypatch.setattr(app.predictor, "trust", 0.0)  # every context trusted: no reliability computed
    trusted = infer(client, "multiverseg", IDS[3], {"client_id": "t"}).json()
    assert trusted["context_size"] >= 1 and trusted["context_reliability"] is None


def test_auto_segments_every_label_with_context(server):
    client, _, _ = server
    r = infer(client, "multiverseg_auto", IDS[3], {}, "all")
    assert r.status_code == 200, r.text
    params, body = split_multipart(r)
    assert set(params["label_names"]) == {"head", "skull"}
    assert np.asarray(Image.open(io.BytesIO(body))).shape == hc18_pair(IDS[3])[0].shape


# -- clients' request shapes ---------------------------------------------------------------------------


def test_slicer_2d_model_on_a_volume(server):
    """Slicer: clicks [i, j, k] on slice k, 'slice': k, NRRD uint8 result holding the whole volume."""
    client, _, studies = server
    vol, header = nrrd.read(str(studies / "vol_nrrd.nrrd"))
    label = np.load(studies.parent / "volume_label.npy")
    k = 2
    ii, jj = np.nonzero(label[:, :, k])
    params = {"foreground": [[int(ii.mean()), int(jj.mean()), k]], "background": [], "slice": k,
              "result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "slicer"}
    r = infer(client, "multiverseg", "vol_nrrd", params, "all")
    assert r.status_code == 200, r.text
    info, body = split_multipart(r)
    out_path = studies.parent / "slicer_out.nrrd"
    out_path.write_bytes(body)
    out, out_header = nrrd.read(str(out_path))
    assert out.shape == vol.shape and out.dtype == np.uint8
    assert not np.delete(out, k, axis=2).any()  # only the requested slice is filled
    np.testing.assert_allclose(out_header["space directions"], header["space directions"])
    np.testing.assert_allclose(out_header["space origin"], header["space origin"])
    assert info["slice"] == k


def test_ohif_image_output_keeps_voxel_order(server):
    """OHIF: output=image, NRRD uint8; the buffer must line up with the volume voxel for voxel."""
    client, _, studies = server
    vol = nib.load(str(studies / "vol_nifti.nii.gz"))
    label = np.load(studies.parent / "volume_label.npy")
    k = 1
    ii, jj = np.nonzero(label[:, :, k])
    params = {"foreground": [[int(ii.mean()), int(jj.mean()), k]], "result_extension": ".nrrd",
              "result_dtype": "uint8"}
    r = infer(client, "multiverseg", "vol_nifti", params, "image")
    assert r.status_code == 200, r.text
    out_path = studies.parent / "ohif_out.nrrd"
    out_path.write_bytes(r.content)
    out, header = nrrd.read(str(out_path))
    assert out.shape == vol.shape
    assert not np.delete(out, k, axis=2).any()
    # RAS affine of the NIfTI comes back as the same geometry in LPS
    np.testing.assert_allclose(np.abs(np.asarray(header["space directions"])), np.abs(vol.affine[:3, :3].T))


def test_ohif_result_compress_false_is_raw_nrrd(server):
    """OHIF asks ``result_compress: false`` and copies the bytes straight into its labelmap."""
    client, _, studies = server
    label = np.load(studies.parent / "volume_label.npy")
    ii, jj = np.nonzero(label[:, :, 1])
    params = {"foreground": [[int(ii.mean()), int(jj.mean()), 1]], "result_extension": ".nrrd",
              "result_dtype": "uint8", "result_compress": False}
    r = infer(client, "multiverseg", "vol_nifti", params, "image")
    assert r.status_code == 200, r.text
    head, _, payload = r.content.partition(b"\n\n")
    assert b"encoding: raw" in head
    assert len(payload) == label.size  # one byte per voxel, as OHIF reads it
    params["result_compress"] = True
    assert b"encoding: gzip" in infer(client, "multiverseg", "vol_nifti", params, "image").content[:300]
    params.update(result_extension=".nii.gz", result_compress=False)
    out = studies.parent / "uncompressed.nii"
    out.write_bytes(infer(client, "multiverseg", "vol_nifti", params, "image").content)
    assert nib.load(str(out)).shape == label.shape  # plain NIfTI, not gzip under a .nii.gz name


def slicer_click(client, image_id, mask, **extra):
    """Slicer's request on a 2D image: a one-slice volume, clicks [i, j, 0] with i = x, NRRD back."""
    ys, xs = np.nonzero(mask)
    params = {"foreground": [[int(xs.mean()), int(ys.mean()), 0]], "result_extension": ".nrrd",
              "result_dtype": "uint8", "client_id": "slicer-2d", **extra}
    return infer(client, "multiverseg", image_id, params, "image")


def test_slicer_2d_answer_is_in_the_image_voxel_order(server):
    """A 216 x 320 PNG is a 320 x 216 image to Slicer (x first): the NRRD answer must be too."""
    client, _, studies = server
    image, mask = hc18_pair(IDS[2])
    assert image.shape[0] != image.shape[1]
    png = np.asarray(Image.open(io.BytesIO(infer(client, "multiverseg", IDS[2], {
        "foreground": [[int(np.nonzero(mask)[1].mean()), int(np.nonzero(mask)[0].mean())]],
        "client_id": "png-2d"}, "image").content)))
    r = slicer_click(client, IDS[2], mask)
    assert r.status_code == 200, r.text
    path = studies.parent / "slicer_2d.nrrd"
    path.write_bytes(r.content)
    out, _ = nrrd.read(str(path))
    out = out[..., 0] if out.ndim == 3 else out
    assert out.shape == (image.shape[1], image.shape[0])
    np.testing.assert_array_equal(out.T, png)  # the same mask as the PNG answer, in x-first order


@pytest.mark.parametrize("one_slice", [False, True])
def test_slicer_saves_a_2d_label_as_nrrd(server, one_slice):
    """Slicer saves a 2D image's label as NRRD (x first, 2D or one slice): stored as the image's PNG label."""
    client, app, studies = server
    ensure_final(client, studies)  # replaced by the same mask: IDS[0] is labelled in any case
    _, mask = hc18_pair(IDS[0])
    label = mask.T.astype(np.uint8)[..., None] if one_slice else mask.T.astype(np.uint8)
    path = studies.parent / "slicer_label.nrrd"
    nrrd.write(str(path), label, index_order="F")
    r = client.put(f"/datastore/label?image={IDS[0]}&tag=final", data={"params": "{}"},
                   files={"label": ("label.nrrd", path.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    saved = studies / "labels" / "final" / f"{IDS[0]}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(saved)) > 0, mask)
    assert not (studies / "labels" / "final" / f"{IDS[0]}.nrrd").exists()
    assert ("head" in app.context.sizes()) and any(
        key == (IDS[0], None) for key in app.context.get("head").ids())


def test_volume_slices_join_the_context_of_neighbouring_slices(server):
    client, app, _ = server
    held = app.interactions.nbytes
    first = infer(client, "multiverseg", "vol_nifti", {"foreground": [[100, 150, 3]], "client_id": "vol"}).json()
    nxt = infer(client, "multiverseg", "vol_nifti", {"slice": 4, "client_id": "vol"}).json()
    assert nxt["context_size"] == first["context_size"] + 1  # slice 3's result
    # what the session keeps of a slice is its model-grid context entry and logits, not the full-size arrays:
    # two of each here
    assert app.interactions.nbytes - held < 8 * 128 * 128 * 4


def test_interaction_state_is_bounded_in_bytes():
    """However many clients click, the state keeps at most ``max_bytes``, dropping the least recently used."""
    import sys

    import torch

    sys.path.insert(0, str(APP_DIR))
    from mvlabel.interactions import InteractionStore
    from mvseg.context import ContextSet

    logits = torch.zeros(1, 128, 128)  # 64 KiB
    store = InteractionStore(max_bytes=6 * logits.nbytes)
    for client in range(20):
        store.remember((f"c{client}", "img", "label", None), logits, 1)
    assert store.nbytes <= 6 * logits.nbytes
    assert store.previous(("c19", "img", "label", None), 2) is not None  # the newest are kept
    assert store.previous(("c0", "img", "label", None), 2) is None
    entry = ContextSet().prepare(np.random.rand(300, 300), np.eye(300))  # 128 KiB and a little
    volume = ("c0", "vol", "label")
    for index in range(50):  # one long volume session: each click's state and slice are kept, ...
        state = volume + (index, None)
        store.remember(state, logits, 1)
        store.accept_slice(volume, index, entry, state_key=state)
        assert store.previous(state, 2) is not None
        assert store.nbytes <= 6 * logits.nbytes
    # ... and of the earlier slices those nearest the one being worked on
    assert [i for i, _ in store.neighbours(volume, 49, 10)] == [48]


def test_qupath_wsi_v2_patch_returns_polygons_inside_the_patch(server):
    client, _, _ = server
    image, mask = hc18_pair(IDS[2])
    x0, y0 = 1000, 2000  # the patch's place in the slide (level 0)
    ys, xs = np.nonzero(mask)
    click = [int(xs.mean()) + x0, int(ys.mean()) + y0]
    wsi = {"level": 0, "location": [x0, y0], "size": [image.shape[1], image.shape[0]], "tile_size": [1024, 1024],
           "min_poly_area": 10, "params": {"foreground": [click], "background": []}}
    r = client.post("/infer/wsi_v2/multiverseg?output=asap", data={"wsi": json.dumps(wsi)},
                    files={"file": ("patch.png", png_bytes(image), "image/png")})
    assert r.status_code == 200, r.text
    root = ET.fromstring(r.content)
    coords = [(float(c.get("X")), float(c.get("Y"))) for c in root.iter("Coordinate")]
    assert coords, "expected at least one polygon"
    xs_, ys_ = np.array(coords).T
    assert xs_.min() >= x0 - 1 and xs_.max() <= x0 + image.shape[1] + 1
    assert ys_.min() >= y0 - 1 and ys_.max() <= y0 + image.shape[0] + 1


def test_qupath_wsi_v2_clicks_on_the_same_uploaded_patch_refine_the_last_answer(server):
    """wsi_v2 uploads the region with every click, each time to a new temporary file: the interaction state
    was keyed by that file, so no click refined the one before. The same pixels are the same image."""
    client, _, _ = server
    image, mask = hc18_pair(IDS[2])
    ys, xs = np.nonzero(mask)
    inside, outside = [int(xs.mean()), int(ys.mean())], [5, 5]

    def click(foreground, background, patch=image):
        wsi = {"level": 0, "location": [0, 0], "size": [patch.shape[1], patch.shape[0]],
               "params": {"foreground": foreground, "background": background, "client_id": "qupath-v2"}}
        r = client.post("/infer/wsi_v2/multiverseg?output=json", data={"wsi": json.dumps(wsi)},
                        files={"file": ("patch.png", png_bytes(patch), "image/png")})
        assert r.status_code == 200, r.text
        return r.json()

    assert click([inside], [])["refined"] is False
    assert click([inside], [outside])["refined"] is True
    assert click([inside], [outside, [6, 6]], patch=255 - image)["refined"] is False  # other pixels


def test_qupath_wsi_region_on_a_datastore_image(server):
    client, _, _ = server
    wsi = {"level": 0, "location": [50, 40], "size": [200, 150], "min_poly_area": 0,
           "params": {"foreground": [[150, 110]]}}
    r = client.post(f"/infer/wsi/multiverseg?image={IDS[3]}&output=asap", json=wsi)
    assert r.status_code == 200, r.text
    coords = [(float(c.get("X")), float(c.get("Y"))) for c in ET.fromstring(r.content).iter("Coordinate")]
    if coords:
        xs_, ys_ = np.array(coords).T
        assert xs_.min() >= 49 and xs_.max() <= 251 and ys_.min() >= 39 and ys_.max() <= 191


# -- bad input: 4xx with a message, nothing saved is touched -------------------------------------------


@pytest.mark.parametrize(
    "model, image, params, status",
    [
        ("nope", IDS[0], {}, 404),
        ("multiverseg", "no-such-image", {"foreground": [[1, 1]]}, 404),
        ("multiverseg", IDS[0], {"foreground": [[5000, 10]]}, 422),
        ("multiverseg", IDS[0], {"foreground": [[1, 2, 3]]}, 422),  # [x, y, 0] is fine, a third index is not
        ("multiverseg", IDS[0], {"foreground": "here"}, 422),
        ("multiverseg", IDS[0], {"foreground": [[1, 1]], "label": "liver"}, 404),
        ("multiverseg", IDS[0], {"roi": [10, 5000, 10, 20]}, 422),
        ("multiverseg", IDS[0], {"roi": [1, 2, 3]}, 422),
        ("multiverseg", "vol_nrrd", {"foreground": [[1, 1, 99]]}, 422),
        ("multiverseg", "vol_nrrd", {"slice": 99}, 422),
        ("multiverseg", "vol_nrrd", {}, 422),
        ("multiverseg", "vol_nrrd", {"foreground": [[10, 10, 3]], "slice": 1}, 422),  # no click on that slice
        ("multiverseg", IDS[0], {"foreground": [[1, 1]], "slice": 7}, 422),  # a 2D image has slice 0 only
        ("multiverseg", IDS[0], {"foreground": [[1, 1]], "client_id": {"a": 1}}, 422),
        ("multiverseg", IDS[0], {"foreground": [[1, 1]], "result_extension": 123}, 422),
        ("multiverseg", IDS[0], {"foreground": [[1, 1]], "save_label": True, "label_tag": "FINAL"}, 422),
        ("multiverseg", IDS[0], {"foreground": [[1, 1]], "save_label": True, "label_tag": "final"}, 409),
        ("multiverseg_auto", IDS[0], {"label_name": "liver"}, 404),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, model, image, params, status):
    client, _, studies = server
    saved = ensure_final(client, studies)
    r = infer(client, model, image, params)
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert final_label_bytes(studies, IDS[0]) == saved


def test_an_roi_over_the_whole_volume_is_a_box(server):
    """Slicer's ROI bounds are inclusive, but a bound one past the last voxel (an exclusive end) is the edge."""
    client, _, _ = server
    vol, _ = nrrd.read(str(server[2] / "vol_nrrd.nrrd"))
    whole = [v for n in vol.shape for v in (0, n)]
    r = infer(client, "multiverseg", "vol_nrrd", {"roi": whole, "slice": 2})
    assert r.status_code == 200, r.text
    r = infer(client, "multiverseg", "vol_nrrd", {"roi": [0, vol.shape[0] + 1] + whole[2:], "slice": 2})
    assert r.status_code == 422 and "outside" in r.json()["detail"]


def test_corrupt_upload_is_422(server):
    client, _, _ = server
    r = client.post("/infer/multiverseg?output=json", data={"params": json.dumps({"foreground": [[1, 1]]})},
                    files={"file": ("x.png", b"not a png at all", "image/png")})
    assert r.status_code == 422 and "cannot read" in r.json()["detail"]


def test_scribble_of_the_wrong_shape_is_422(server):
    client, _, _ = server
    r = infer(client, "multiverseg", IDS[0], {}, files={"label": ("s.png", png_bytes(np.zeros((5, 5), np.uint8)), "x")})
    assert r.status_code == 422 and "shape" in r.json()["detail"]


def test_scribbles_are_prompts(server):
    client, _, _ = server
    image, mask = hc18_pair(IDS[1])
    scribble = np.zeros(mask.shape, np.uint8)
    ys, xs = np.nonzero(mask)
    scribble[int(ys.mean()) - 2 : int(ys.mean()) + 2, int(xs.mean()) - 20 : int(xs.mean()) + 20] = 3
    scribble[:5, :40] = 2
    r = infer(client, "multiverseg", IDS[1], {"client_id": "s"}, files={"label": ("s.png", png_bytes(scribble), "x")})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "label, name, status",
    [
        (np.zeros((7, 9), np.uint8), "label.png", 422),  # wrong shape
        (None, "label.png", 422),  # corrupt file
        (None, "label.exe", 415),  # unknown format
    ],
)
def test_bad_labels_are_refused_and_the_saved_one_kept(server, label, name, status):
    client, _, studies = server
    saved = ensure_final(client, studies)
    body = png_bytes(label) if label is not None else b"garbage"
    r = client.put(f"/datastore/label?image={IDS[0]}&tag=final", data={"params": "{}"},
                   files={"label": (name, body, "application/octet-stream")})
    assert r.status_code == status, r.text
    assert final_label_bytes(studies, IDS[0]) == saved


def test_label_for_unknown_image_is_404(server):
    client, _, _ = server
    r = save_final(client, "no-such-image", np.ones((4, 4), np.uint8))
    assert r.status_code == 404


def test_unknown_strategy_is_404(server):
    client, _, _ = server
    r = client.post("/activelearning/nope", json={})
    assert r.status_code == 404 and "random" in r.json()["detail"]


def start_app(tmp_path, conf: dict):
    """The app (without the HTTP layer) on a one-image datastore and tiny weights, with extra ``--conf``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("multiverseg_main", APP_DIR / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    save_tiny_weights(tmp_path / "tiny.pt")
    studies = make_studies(tmp_path / "studies", IDS[:1])
    return main.MultiverSegApp(str(APP_DIR), str(studies), {"weights": str(tmp_path / "tiny.pt"), "device": "cpu", **conf})


@pytest.mark.parametrize(
    "conf, message",
    [
        ({"strategy": "nope"}, "--conf strategy must be one of nearest, confident, coverage"),
        ({"axis": "3"}, "--conf axis must be 0, 1 or 2"),
        ({"axis": "z"}, "--conf axis must be 0, 1 or 2, got 'z'"),
        ({"size": "big"}, "--conf size must be a positive whole number of pixels, got 'big'"),
        ({"size": "0"}, "--conf size must be a positive whole number of pixels, got '0'"),
        ({"size": "100"}, "size 100 must be a positive multiple of 8"),
        ({"device": "gpu0"}, "--conf device must be cpu, cuda, cuda:N or mps, got 'gpu0'"),
        ({"device": "xla"}, "--conf device xla: this machine has no such device"),
        ({"device": "cuda:7"}, "--conf device cuda:7: this machine has no such device"),
        ({"refine": "maybe"}, "--conf refine must be true or false, got 'maybe'"),
        ({"zoom": "2"}, "--conf zoom must be true or false, got '2'"),
        ({"dtype": "half"}, "--conf dtype must be auto, float32 or bfloat16, got 'half'"),
        ({"blend": "half"}, "--conf blend must be a number from 0 to 1, got 'half'"),
        ({"blend": "2", "weights": ""}, "--conf blend must be a number from 0 to 1, got '2'"),
        ({"trust": "nan"}, "--conf trust must be a number from 0 to 1, got 'nan'"),
        ({"trust": "-0.1"}, "--conf trust must be a number from 0 to 1, got '-0.1'"),
        ({"max_context": "0"}, "--conf max_context must be a positive whole number, got '0'"),
        ({"slices_per_volume": "four"}, "--conf slices_per_volume must be a positive whole number, got 'four'"),
        ({"state_expiry": "-5"}, "--conf state_expiry must be a positive number of seconds, got '-5'"),
        ({"lease_window": "nan"}, "--conf lease_window must be a positive number of seconds, got 'nan'"),
        ({"history_keep": "-1"}, "--conf history_keep must be a whole number or 'all', got '-1'"),
        ({"history_keep": "\u00b2"}, "--conf history_keep must be a whole number or 'all'"),
        ({"max_pixels": "\u00b2"}, "--conf max_pixels must be a positive whole number"),
        ({"label": "white_matter"}, "--conf label: no such setting; known: axis"),  # 'labels' mistyped
        ({"labels": ","}, "--conf labels must name each label once"),
        ({"labels": "wm,wm"}, "--conf labels must name each label once"),
    ],
)
def test_bad_app_conf_stops_start_up(tmp_path, conf, message):
    """A mistyped ``--conf`` stops the server at start-up with the valid choices, not on the first request."""
    with pytest.raises(ValueError, match=message):
        start_app(tmp_path, conf)


def test_a_datastore_folder_the_server_cannot_write_stops_start_up_with_a_reason(tmp_path):
    """(Here the lock file cannot be written because a folder has its name; on a read-only mount it is the
    same failure.) MONAI Label stopped with a traceback about '.lock'."""
    (tmp_path / "studies" / ".lock").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="datastore folder .* is not writable"):
        start_app(tmp_path, {})


def test_conf_size_sets_the_model_grid(tmp_path):
    """``--conf size`` is the grid the network and every context set work on."""
    app = start_app(tmp_path, {"size": "64"})
    assert app.predictor.size == 64 and app.predictor.new_context().size == 64


def test_conf_refine_switches_boundary_refinement(tmp_path):
    assert start_app(tmp_path / "on", {}).predictor.refiner is not None
    assert start_app(tmp_path / "off", {"refine": "False"}).predictor.refiner is None


def test_conf_zoom_switches_the_second_look(tmp_path):
    assert start_app(tmp_path / "on", {}).predictor.zoom is not None
    assert start_app(tmp_path / "off", {"zoom": "false"}).predictor.zoom is None


def test_conf_fallback_sets_the_network_for_an_empty_context(tmp_path):
    """The bundled weights come with their first-image network; ``--conf fallback none`` turns it off."""
    from mvseg import MultiverSegNet

    assert isinstance(start_app(tmp_path / "bundled", {"weights": ""}).predictor.fallback, MultiverSegNet)
    assert start_app(tmp_path / "off", {"weights": "", "fallback": "None"}).predictor.fallback is None
    assert start_app(tmp_path / "other", {}).predictor.fallback is None  # other weights: no bundled fallback
    with pytest.raises(Exception, match="missing.pt"):
        start_app(tmp_path / "bad", {"fallback": str(tmp_path / "missing.pt")})


def test_conf_blend_sets_the_first_image_networks_share(tmp_path):
    assert start_app(tmp_path / "bundled", {"weights": ""}).predictor.blend == 0.5
    assert start_app(tmp_path / "off", {"weights": "", "blend": "0"}).predictor.blend == 0.0
    assert start_app(tmp_path / "other", {}).predictor.blend == 0.0


def test_conf_trust_sets_the_least_context_reliability(tmp_path):
    assert start_app(tmp_path / "bundled", {"weights": ""}).predictor.trust == 0.75
    assert start_app(tmp_path / "off", {"weights": "", "trust": "0"}).predictor.trust == 0.0
    assert start_app(tmp_path / "other", {}).predictor.trust == 0.0
    assert start_app(tmp_path / "set", {"trust": "0.5"}).predictor.trust == 0.5


def test_conf_dtype_sets_the_network_precision(tmp_path):
    import torch

    assert start_app(tmp_path / "f", {"dtype": "float32"}).predictor.dtype == torch.float32
    assert start_app(tmp_path / "b", {"dtype": "BFloat16"}).predictor.dtype == torch.bfloat16
    assert start_app(tmp_path / "a", {}).predictor.dtype in (torch.float32, torch.bfloat16)


# -- next sample ---------------------------------------------------------------------------------------


def test_strategies_default_first_and_explain_the_pick(server):
    client, _, _ = server
    strategies = list(client.get("/info/").json()["strategies"])
    assert strategies[0] == "nearest"
    assert {"coverage", "nearest", "hybrid", "uncertainty", "random", "first"} <= set(strategies)
    r = client.post("/activelearning/coverage", json={"client_id": "ann-1"})
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["id"] and first["strategy"] == "coverage" and first["score"] is not None and first["reason"]
    second = client.post("/activelearning/coverage", json={"client_id": "ann-2"}).json()
    assert second["id"] != first["id"]  # not handed to another annotator within the lease window
    again = client.post("/activelearning/coverage", json={"client_id": "ann-1"}).json()
    assert again["id"] == first["id"]
    # MONAI Label merged its lease record (who was offered the image) over the strategy's name
    assert again["strategy"] == "coverage" and again["path"].endswith(again["name"])  # Slicer loads a local path


def test_background_scores_are_stored_in_image_info(server, monkeypatch):
    """... with one write of the index per pass (one per image made next sample wait seconds on 2,000)."""
    client, app, studies = server
    ensure_final(client, studies)  # the model-based scores need a context
    store, writes = app.datastore(), []
    write = store._update_datastore_file
    monkeypatch.setattr(store, "_update_datastore_file", lambda *a, **k: (writes.append(1), write(*a, **k)))
    passes, deadline = app.scoreboard.passes, time.monotonic() + 60
    while app.scoreboard.passes == passes and time.monotonic() < deadline:
        writes.clear()
        app.scoreboard.score_all()  # returns early while a save's wake-up is pending for the background pass
    assert len(writes) == 1
    unlabelled = app.datastore().get_unlabeled_images()
    info = app.datastore().get_image_info(unlabelled[0])
    assert set(info["mvseg_scores"]["head"]) == {"coverage", "nearest", "uncertainty", "confident", "hybrid"}
    unsure = app.scoreboard.get("head", "uncertainty")
    assert app.scoreboard.get("head", "confident") == {i: -v for i, v in unsure.items()}
    for k, strategy in enumerate(("uncertainty", "nearest", "confident")):
        r = client.post(f"/activelearning/{strategy}", json={"client_id": f"ann-{3 + k}"}).json()
        assert r["id"] in unlabelled and r["score"] == pytest.approx(app.scoreboard.get("head", strategy)[r["id"]])


def test_next_sample_for_an_unknown_label_is_404(server):
    client, _, _ = server
    r = client.post("/activelearning/hybrid", json={"label": "liver"})
    assert r.status_code == 404


def test_next_sample_leases_that_ran_out_are_forgotten():
    """Every image ever handed out stayed in the lease table, deleted ones included."""
    import sys

    sys.path.insert(0, str(APP_DIR))
    from mvlabel.nextsample import Leases

    leases = Leases(window=0.05)
    leases.give("a", "alice")
    assert not leases.free_for("a", "bob")
    time.sleep(0.1)
    leases.give("b", "bob")
    assert leases.free_for("a", "bob") and list(leases._given) == ["b"]


def test_one_user_holds_a_few_images_however_many_clients_they_name():
    """A user names their own client_ids: with one lease per client, one annotator took every image."""
    import sys

    sys.path.insert(0, str(APP_DIR))
    from mvlabel.nextsample import MAX_LEASES_PER_USER, Leases

    leases, ranked = Leases(window=600, per_user=True), list("abcdefgh")
    got = [leases.claim(ranked, ("mallory", "client", str(i))) for i in range(8)]
    assert got[:MAX_LEASES_PER_USER] == ranked[:MAX_LEASES_PER_USER]  # then the oldest go first
    held = {i for i, (client, _) in leases._given.items() if client[0] == "mallory"}
    assert len(held) == MAX_LEASES_PER_USER and held == set(got[-MAX_LEASES_PER_USER:])
    assert leases.claim(ranked, ("bob", "client", "x")) not in held | {None}


def test_without_authentication_every_client_holds_its_own_lease():
    """Without authentication everyone is 'anonymous': the per-user cap made all annotators share 4 leases,
    and a fifth one took an image already handed to another."""
    import sys

    sys.path.insert(0, str(APP_DIR))
    from mvlabel.nextsample import Leases

    leases, ranked = Leases(window=600, per_user=False), list("abcdefgh")
    got = [leases.claim(ranked, ("anonymous", "client", str(i))) for i in range(6)]
    assert got == list("abcdef")


def test_monai_labels_own_role_check_takes_the_guards_cached_identity(monkeypatch):
    """MONAI Label checks the token again on the event loop: it verified it afresh (the keys fetched there)."""
    import sys

    sys.path.insert(0, str(APP_DIR))
    import monailabel.endpoints.user.auth as auth
    from mvlabel.access import Identity, TokenCache, install_monailabel_user

    class Counting:
        role_names = {1: "monailabel-user"}
        calls = 0

        def identity(self, token):
            self.calls += 1
            return Identity("u", 1, ["monailabel-user"])

    monkeypatch.setattr(auth, "from_token", auth.from_token)  # put back afterwards
    verifier = Counting()
    tokens = TokenCache(verifier)
    install_monailabel_user(tokens)
    tokens.identity("t")  # the guard's check
    assert auth.from_token("t").username == "u" and verifier.calls == 1


def test_an_image_that_cannot_be_read_is_not_offered_and_keeps_no_lease():
    """MONAI Label looks the pick's file up after the strategy: an unreadable one answered 422. It is passed
    over, and its lease given back (it counted against the user's cap)."""
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(APP_DIR))
    from mvlabel.nextsample import Leases, NextSample

    class Board:
        unreadable: set = set()
        context = SimpleNamespace(names=["head"], label_names=lambda: ["head"])

        def readable(self, image_id):
            if image_id == "bad":
                self.unreadable.add(image_id)
            return image_id != "bad"

    store = SimpleNamespace(get_unlabeled_images=lambda: ["bad", "good"], get_image_info=lambda image_id: {})
    leases = Leases(window=600)
    answer = NextSample("first", Board(), leases)({"client_id": "x"}, store)
    assert answer["id"] == "good" and "bad" not in leases._given


def test_a_label_lookup_on_a_pacs_that_does_not_answer_is_not_taken_for_no_label():
    import sys
    from types import SimpleNamespace

    import requests

    sys.path.insert(0, str(APP_DIR))
    from mvlabel.guard import has_label

    def down(image_id, tag):
        raise requests.ConnectionError("refused")

    def missing(image_id, tag):
        raise KeyError(tag)  # MONAI Label's datastores raise for a label they do not have

    with pytest.raises(requests.ConnectionError):
        has_label(SimpleNamespace(get_label_uri=down), "a", "final")
    assert has_label(SimpleNamespace(get_label_uri=missing), "a", "final") is False
    assert has_label(SimpleNamespace(get_label_uri=lambda image_id, tag: "/x.png"), "a", "final") is True


def test_a_user_name_or_client_id_never_spells_anothers_client():
    import sys

    sys.path.insert(0, str(APP_DIR))
    from mvlabel.guard import client_key, current_client, current_user

    def key(user, client_id=None, address="127.0.0.1"):
        tokens = current_user.set(user), current_client.set((user, "address", address))
        try:
            return client_key(client_id)
        finally:
            current_user.reset(tokens[0])
            current_client.reset(tokens[1])

    assert key("carol/x", "y") != key("carol", "x/y")
    assert key("dave/c") != key("dave", "c@127.0.0.1") and key("dave", "c") == key("dave", "c")


def test_two_annotators_asking_at_once_never_get_one_image():
    """The lease was checked, the image ranked, then given: between the two another annotator got it too."""
    import sys
    import threading

    sys.path.insert(0, str(APP_DIR))
    from mvlabel.nextsample import Leases

    leases, got, barrier = Leases(window=600), [], threading.Barrier(8)

    def ask(client):
        barrier.wait()
        got.append(leases.claim(["a", "b", "c", "d", "e", "f", "g", "h"], client))

    threads = [threading.Thread(target=ask, args=(f"annotator{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list("abcdefgh")
    assert leases.claim(["a"], "annotator9") is None and leases.claim(["a", "z"], "annotator9") == "z"


def test_a_batch_job_skips_an_image_deleted_meanwhile():
    """One image deleted while a batch job ran stopped the job with an error: the images after it were
    never segmented."""
    import sys

    from fastapi import HTTPException

    sys.path.insert(0, str(APP_DIR))
    from mvlabel.infer import BatchInfer

    done = []

    def infer(request, datastore):
        if request["image"] == "gone":
            raise HTTPException(status_code=404, detail="image 'gone' is not in the datastore")
        done.append(request["image"])
        return {"file": None, "params": {}}

    BatchInfer()({"images": ["a", "gone", "z"], "max_workers": 1}, None, infer)
    assert done == ["a", "z"]

