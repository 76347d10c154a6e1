"""A server a hospital can expose: nothing saved is lost, no file outside the datastore is read or written,
malformed requests get a 4xx with a message, MONAI Label's own endpoints included (issue of hardening)."""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

from .app_helpers import app_client, hc18_ids, hc18_pair, make_studies, png_bytes

IDS = hc18_ids(4, start=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    studies = make_studies(root / "studies", IDS)
    (root / "outside.png").write_bytes(png_bytes(np.full((32, 32), 200, np.uint8)))
    with app_client(studies, {"labels": "head,skull", "max_pixels": 4_000_000}) as (client, app):
        save = put_label(client, IDS[0], hc18_pair(IDS[0])[1])
        assert save.status_code == 200, save.text
        yield client, app, studies


def server_temp_files() -> set:
    """What the server and MONAI Label name their temporary files and folders in the temp folder (other
    programs may write there meanwhile)."""
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(("tmp", "mvseg-"))}


def put_label(client, image, mask, tag="final", params="{}", name="label.png"):
    """``mask``: an array, sent as a uint8 PNG, or a PIL image, sent as it is in the format ``name`` says."""
    if isinstance(mask, Image.Image):
        buf = io.BytesIO()
        mask.save(buf, format=Image.registered_extensions()[os.path.splitext(name)[1]])
        content = buf.getvalue()
    else:
        content = png_bytes(mask.astype(np.uint8))
    return client.put(f"/datastore/label?image={image}&tag={tag}", data={"params": params},
                      files={"label": (name, content, "application/octet-stream")})


def final_bytes(studies, image=IDS[0]) -> bytes:
    return (studies / "labels" / "final" / f"{image}.png").read_bytes()


def infer(client, image, params, output="json", files=None):
    body = params if isinstance(params, str) else json.dumps(params)
    return client.post(f"/infer/multiverseg?image={image}&output={output}", data={"params": body}, files=files)


def tree(folder) -> set:
    """Every file below ``folder``, but the datastore's own atomic writes in flight (``.*.tmp``: the background
    scorer may be renaming datastore_v2.json into place at that moment)."""
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files
            if not (f.startswith(".") and f.endswith(".tmp"))}


# -- tags are names, final is written by a label save only ----------------------------------------------


@pytest.mark.parametrize("tag", ["./final", "../labels/final", "final/", "..", "a/b", "x" * 65])
def test_infer_never_writes_final_whatever_the_tag_looks_like(server, tag):
    client, _, studies = server
    before = final_bytes(studies)
    _, mask = hc18_pair(IDS[0])
    ys, xs = np.nonzero(mask)
    r = infer(client, IDS[0], {"foreground": [[int(xs.mean()), int(ys.mean())]], "save_label": True,
                               "label_tag": tag})
    assert 400 <= r.status_code < 500 and "tag" in r.json()["detail"]
    assert final_bytes(studies) == before


@pytest.mark.parametrize("tag", ["./final", "../../escape", "final/../final", "/tmp/x"])
def test_a_label_tag_is_a_name_never_a_path(server, tag):
    client, _, studies = server
    before, files = final_bytes(studies), tree(studies.parent)
    r = put_label(client, IDS[0], np.zeros_like(hc18_pair(IDS[0])[1]), tag=tag)
    assert r.status_code == 422 and "tag" in r.json()["detail"]
    assert final_bytes(studies) == before and tree(studies.parent) == files


@pytest.mark.parametrize("params", ["[1, 2]", '"abc"', "{x", "null", '{"label_info": "white"}',
                                    '{"label_info": [{"name": "a", "idx": 999}]}',
                                    '{"label_info": [{"name": "a", "id": "zz"}]}'])  # 'id' stands in for 'idx': a 500
def test_label_params_that_are_not_an_object_change_nothing(server, params):
    client, _, studies = server
    before = final_bytes(studies)
    r = put_label(client, IDS[0], np.zeros_like(hc18_pair(IDS[0])[1]), params=params)
    assert r.status_code in (400, 422), r.text
    assert final_bytes(studies) == before


@pytest.mark.parametrize("image", ["../../escape_noext", "/etc/passwd", "..", ".hidden"])
def test_an_uploaded_image_lands_under_a_name_inside_the_datastore(server, image):
    client, _, studies = server
    files = tree(studies.parent)
    r = client.put(f"/datastore/image?image={image}", data={"params": "{}"},
                   files={"file": ("x.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")})
    assert r.status_code == 422, r.text
    assert tree(studies.parent) == files


# -- only datastore images and this request's uploads are read -----------------------------------------


def test_a_path_in_place_of_an_image_id_reveals_nothing(server):
    client, _, studies = server
    outside = str(studies.parent / "outside.png")
    answers = [infer(client, path, {"foreground": [[5, 5]]}) for path in (outside, outside + ".missing")]
    assert [r.status_code for r in answers] == [422, 422]
    assert answers[0].json()["detail"].replace(outside, "") == answers[1].json()["detail"].replace(outside + ".missing", "")
    for params in ({"image": outside}, {"label": outside}, {"label": "../../outside.png"}):
        r = infer(client, IDS[1], {"foreground": [[5, 5]], **params})
        assert r.status_code == 422, (params, r.text)


# -- every malformed request is a 4xx with a message ----------------------------------------------------


# "\x1c" and "\x0b" are whitespace to Python's str.strip, not to JSON (the fuzzer's 500 on image info)
@pytest.mark.parametrize("params", ["{x", "[1,2]", '"hello"', "null", "\x1c", "  ", "\x0b"])
def test_params_that_are_not_a_json_object(server, params):
    client, _, _ = server
    assert infer(client, IDS[1], params).status_code in (400, 422)
    r = client.put(f"/datastore/image/info?image={IDS[1]}", data={"info": params})
    assert r.status_code in (400, 422), r.text


def test_empty_image_info_is_refused(server):
    """MONAI Label parses 'info' as it is, so an empty one is no JSON (only an empty 'params' means {})."""
    client, _, _ = server
    r = client.put(f"/datastore/image/info?image={IDS[1]}", data={"info": ""})
    assert r.status_code == 400 and "info" in r.json()["detail"], r.text


@pytest.mark.parametrize("params, word", [
    ({"foreground": [[1e30, 5]]}, "foreground"),
    ({"foreground": [[5, 5]], "result_dtype": "U5"}, "result_dtype"),
    ({"foreground": [[5, 5]], "scribbles_fg_label": "abc"}, "scribbles_fg_label"),
    ({"foreground": [["a", 5]]}, "foreground"),
    ({"foreground": [[5, 5]], "slice": "x"}, "slice"),
])
def test_bad_values_name_the_field(server, params, word):
    client, _, _ = server
    r = infer(client, IDS[1], params)
    assert r.status_code == 422 and word in r.json()["detail"], r.text


@pytest.mark.parametrize("body, status", [
    ({"label_tag": "./final", "save_label": True}, 422),
    ({"label_tag": "final", "save_label": True}, 409),
    ({"label_tag": "../labels/final"}, 422),
])
def test_batch_inference_never_writes_final(server, body, status):
    client, _, studies = server
    before = final_bytes(studies)
    r = client.post("/batch/infer/multiverseg_auto", json=body)
    assert r.status_code == status, r.text
    assert final_bytes(studies) == before


def test_other_malformed_requests(server):
    client, _, _ = server
    r = client.post(f"/infer/multiverseg?image={IDS[1]}&output=dicom_seg", data={"params": "{}"})
    assert r.status_code == 422 and "dicom_seg" in r.text
    r = client.post("/infer/multiverseg", data={"params": "{}"})
    assert r.status_code == 422 and "image" in r.text
    assert client.delete("/datastore/image?id=no-such-image").status_code == 404
    for wsi in ("not json", '{"min_poly_area": "abc"}', '{"params": [1]}', ""):
        r = client.post(f"/infer/wsi_v2/multiverseg?image={IDS[1]}&output=asap", data={"wsi": wsi},
                        files={"file": ("p.png", png_bytes(np.zeros((16, 16), np.uint8)), "image/png")})
        assert r.status_code in (400, 422), (wsi, r.text)


@pytest.mark.parametrize("route", [f"/infer/multiverseg?image={IDS[1]}", f"/infer/wsi_v2/multiverseg?image={IDS[1]}"])
@pytest.mark.parametrize("ctype", ["application/json", "text/plain", None])
def test_a_body_that_is_not_a_form_is_refused_not_ignored(server, route, ctype):
    """MONAI Label reads these routes' fields from a form only: JSON clicks would be dropped and a zero-click
    answer sent as if they had been seen."""
    client, _, _ = server
    headers = {"content-type": ctype} if ctype else {}
    body = json.dumps({"params": {"foreground": [[10, 10]]}})
    r = client.post(route, content=body, headers=headers)
    assert r.status_code == 415 and "form" in r.json()["detail"], r.text
    from fastapi.testclient import TestClient
    from monailabel.app import app as asgi

    elsewhere = TestClient(asgi, client=("10.0.0.3", 50000))  # a state of its own, not the other tests' client's
    assert elsewhere.post(route.replace("wsi_v2/", "")).status_code == 200  # no body: the zero-click call stands


@pytest.mark.parametrize("ctype", ["application/x-foo+json", "Application/JSON; charset=utf-8"])
def test_json_by_any_of_its_names_is_checked(server, ctype, tmp_path):
    """FastAPI reads every application/*+json body as JSON: the guard checks it as such. Before, a path in
    'params.image' sent as application/x-foo+json reached the route, which read the temp file named and,
    on a refusal, deleted it (it took the file for the request's own upload)."""
    client, _, _ = server
    victim = tempfile.NamedTemporaryFile(suffix=".txt", delete=False)
    victim.write(b"somebody else's file")
    victim.close()
    try:
        region = {"location": [10, 10], "size": [50, 50], "params": {"image": victim.name}}
        r = client.post(f"/infer/wsi/multiverseg?image={IDS[1]}&output=json", content=json.dumps(region),
                        headers={"content-type": ctype})
        assert r.status_code == 422 and "params.image" in r.json()["detail"], r.text
        r = client.post("/batch/infer/multiverseg_auto", content=json.dumps({"images": [victim.name]}),
                        headers={"content-type": ctype})
        assert r.status_code in (404, 422), r.text
        assert open(victim.name, "rb").read() == b"somebody else's file"
    finally:
        os.unlink(victim.name)


def test_qupath_json_without_a_content_type_is_read(server):
    """QuPath's plugin sends its region request as JSON without a content type, which FastAPI (strict about
    content types) would not read: every QuPath click was a 422."""
    client, _, _ = server
    location, size, click = _region_click()
    region = {"location": location, "size": size, "params": {"foreground": [click]}}
    r = client.post(f"/infer/wsi/multiverseg?image={IDS[1]}&output=json", content=json.dumps(region))
    assert r.status_code == 200 and r.json()["polygons"] >= 1, r.text


def test_two_content_types_are_refused(server, tmp_path):
    """The guard read the last Content-Type and FastAPI the first: a JSON body sent as 'form' passed unchecked."""
    client, _, _ = server
    region = {"location": [10, 10], "size": [50, 50], "params": {"image": str(tmp_path / "x.png")}}
    headers = [("content-type", "application/json"), ("content-type", "multipart/form-data; boundary=zz")]
    r = client.post(f"/infer/wsi/multiverseg?image={IDS[1]}&output=json", content=json.dumps(region), headers=headers)
    assert r.status_code == 400 and "Content-Type" in r.json()["detail"], r.text


def test_the_body_cannot_name_another_strategy_or_model_than_the_url(server):
    """MONAI Label lets the body's 'strategy' or 'model' win over the one the URL names."""
    client, _, _ = server
    r = client.post("/activelearning/nearest", json={"strategy": "random"})
    assert r.status_code == 422 and "strategy" in r.json()["detail"], r.text
    r = client.post("/batch/infer/multiverseg_auto", json={"model": "multiverseg", "images": [IDS[1]], "label_tag": "m1"})
    assert r.status_code == 422 and "model" in r.json()["detail"], r.text
    r = client.post("/activelearning/nearest", json={"strategy": "nearest", "client_id": "same"})
    assert r.status_code == 200, r.text


def test_a_body_neither_json_nor_a_form_is_refused(server):
    client, _, _ = server
    region = {"location": [10, 10], "size": [50, 50], "params": {"foreground": [["a", 1]]}}
    r = client.post(f"/infer/wsi/multiverseg?image={IDS[1]}&output=json", content=json.dumps(region),
                    headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "JSON" in r.json()["detail"], r.text


def test_an_info_edit_that_is_not_a_form_changes_nothing(server):
    client, _, studies = server
    before = client.get(f"/datastore/image/info?image={IDS[2]}").json()
    r = client.put(f"/datastore/image/info?image={IDS[2]}", json={"info": {"note": "x"}})
    assert r.status_code == 415, r.text
    assert client.get(f"/datastore/image/info?image={IDS[2]}").json() == before


# -- limits ---------------------------------------------------------------------------------------------


def test_a_huge_image_is_refused_before_it_is_decoded(server):
    client, app, studies = server
    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, format="PNG")  # ~100 kB on the wire, 100 M pixels
    r = client.put("/datastore/image?image=huge", data={"params": "{}"},
                   files={"file": ("huge.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    assert not app.datastore().get_image_uri("huge")


def test_a_corrupt_image_never_enters_the_datastore(server):
    client, app, _ = server
    r = client.put("/datastore/image?image=corrupt", data={"params": "{}"},
                   files={"file": ("corrupt.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")})
    assert r.status_code == 422
    assert "'corrupt.png'" in r.json()["detail"] and "tmp" not in r.json()["detail"], r.text  # the client's name
    assert not app.datastore().get_image_uri("corrupt")


def test_transparent_pixels_of_an_image_are_black(tmp_path):
    """What a transparent pixel's colour channels hold is not what the image shows: it is read as black."""
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
    from mvlabel.imageio import read_image

    rgba = np.full((20, 30, 4), 255, np.uint8)  # white, opaque
    rgba[:, :10, 3] = 0  # ... except a transparent band that still holds white
    rgba[:, 10:20, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    for name in ("a.png", "la.png"):
        array = read_image(str(tmp_path / name)).array
        grey = array if array.ndim == 2 else array[..., 0]
        assert (grey[:, :10] == 0).all() and (abs(grey[:, 10:20].astype(int) - 128) <= 1).all()
        assert (grey[:, 20:] == 255).all(), name


def test_a_label_with_too_many_values_is_refused(server):
    client, app, studies = server
    _, mask = hc18_pair(IDS[1])
    ramp = (np.arange(mask.size).reshape(mask.shape) % 256).astype(np.uint8)
    r = put_label(client, IDS[1], ramp)
    assert r.status_code == 422 and "at most" in r.json()["detail"]
    assert sorted(app.context.label_names()) == ["head", "skull"]  # no label_2 .. label_255


def test_a_0_255_mask_is_the_configured_label(server):
    client, app, _ = server
    _, mask = hc18_pair(IDS[2])
    before = app.context.sizes().get("head", 0)
    assert put_label(client, IDS[2], mask.astype(np.uint8) * 255).status_code == 200
    assert app.context.sizes()["head"] == before + 1 and "label_255" not in app.context.label_names()


# -- nothing saved is ever lost -------------------------------------------------------------------------


def test_a_replaced_final_label_keeps_its_earlier_version(server):
    client, app, studies = server
    first = final_bytes(studies)
    for written in (studies / "labels" / "final" / f"{IDS[0]}.png", studies / "datastore_v2.json"):
        assert written.stat().st_mode & 0o044 == 0o044, written  # were owner-only, as temporary files are
    _, mask = hc18_pair(IDS[0])
    assert put_label(client, IDS[0], np.roll(mask, 3, axis=1)).status_code == 200
    history = app.datastore().label_history(IDS[0])
    assert history and open(history[-1]["file"], "rb").read() == first
    assert {"saved_by", "saved_at", "replaced_by", "replaced_at"} <= set(history[-1])
    assert put_label(client, IDS[0], mask).status_code == 200  # back to the ground truth for the others


def test_a_save_while_another_save_of_the_image_runs_is_refused(server):
    client, app, studies = server
    before = final_bytes(studies)
    with app.datastore()._one_save((IDS[0], "final")):  # an annotator's save in progress
        r = put_label(client, IDS[0], np.zeros_like(hc18_pair(IDS[0])[1]))
        assert r.status_code == 409 and "in progress" in r.json()["detail"]
        assert final_bytes(studies) == before
        # a batch job's proposal is another file: it went on being refused, which stopped the whole job
        r = put_label(client, IDS[0], hc18_pair(IDS[0])[1], tag="proposal_x")
        assert r.status_code == 200, r.text
    assert client.delete(f"/datastore/label?id={IDS[0]}&tag=proposal_x").status_code == 200


def test_two_annotators_saving_at_once_lose_nothing(server):
    client, app, studies = server
    _, mask = hc18_pair(IDS[3])
    versions = [mask, np.roll(mask, 5, axis=0)]
    answers = [None, None]

    def save(k):
        answers[k] = put_label(client, IDS[3], versions[k]).status_code

    threads = [threading.Thread(target=save, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) in ([200, 200], [200, 409])
    kept = [np.asarray(Image.open(h["file"])) for h in app.datastore().label_history(IDS[3])]
    kept.append(np.asarray(Image.open(studies / "labels" / "final" / f"{IDS[3]}.png")))
    saved = [k for k, code in enumerate(answers) if code == 200]
    assert all(any(np.array_equal(v, versions[k].astype(np.uint8)) for v in kept) for k in saved)


def test_requests_without_client_id_do_not_share_a_state(server):
    """Two clients without client_id: one's clicks never refine the other's mask."""
    client, _, _ = server
    from fastapi.testclient import TestClient
    from monailabel.app import app as asgi

    other = TestClient(asgi, client=("10.0.0.2", 50000))
    _, mask = hc18_pair(IDS[1])
    ys, xs = np.nonzero(mask)
    first = {"foreground": [[int(xs.mean()), int(ys.mean())]]}
    assert infer(client, IDS[1], first).json()["refined"] is False
    r = other.post(f"/infer/multiverseg?image={IDS[1]}&output=json",
                   data={"params": json.dumps({**first, "background": [[2, 2]]})})
    assert r.json()["refined"] is False  # another client: no previous mask of its own


def test_an_image_uploaded_again_under_a_deleted_ones_id_starts_afresh(server):
    """Clicks on a new image that took a deleted image's id refined the deleted image's prediction."""
    client, _, _ = server
    clicks = {"foreground": [[60, 60]], "client_id": "reuser"}
    for k, key in enumerate((IDS[1], IDS[2])):
        r = client.put("/datastore/image?image=reused", data={"params": "{}"},
                       files={"file": ("reused.png", png_bytes(hc18_pair(key)[0]), "image/png")})
        assert r.status_code == 200, r.text
        assert infer(client, "reused", clicks).json()["refined"] is False  # the second image's too
        clicks = {**clicks, "background": clicks.get("background", []) + [[5, 5 + k]]}
        assert infer(client, "reused", clicks).json()["refined"] is True  # the same image: clicks refine
        clicks = {**clicks, "background": clicks["background"] + [[9, 9]]}  # the user goes on, on a new image
        assert client.delete("/datastore/?id=reused").status_code == 200


def test_an_id_that_is_also_a_file_in_the_working_folder_is_the_datastore_image(server, tmp_path, monkeypatch):
    """image=NAME and params.label=NAME are datastore names, even when a file of that name sits in the
    server's working folder: that file is never read."""
    client, _, studies = server
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((9, 9), 3, np.uint8)).save(tmp_path / f"{IDS[1]}", format="PNG")  # a datastore id
    Image.fromarray(np.full((9, 9), 3, np.uint8)).save(tmp_path / "scribble.png")
    _, mask = hc18_pair(IDS[1])
    ys, xs = np.nonzero(mask)
    r = infer(client, IDS[1], {"foreground": [[int(xs.mean()), int(ys.mean())]], "client_id": "cwd",
                               "save_label": True, "label_tag": "draft"}, output="image")
    assert r.status_code == 200, r.text
    assert np.asarray(Image.open(io.BytesIO(r.content))).shape == mask.shape  # the datastore image's grid
    assert (studies / "labels" / "draft" / f"{IDS[1]}.png").exists()  # and save_label still saved it
    r = infer(client, IDS[1], {"foreground": [[5, 5]], "label": "scribble.png"})
    assert r.status_code == 404 and "unknown label" in r.text  # a label name, not that file


def test_an_image_uploaded_into_a_session_is_segmented(server):
    """Slicer uploads a volume that is not in the datastore into a session, then infers by session id."""
    client, _, _ = server
    image, mask = hc18_pair(IDS[2])
    r = client.put("/session/", files={"files": ("upload.png", png_bytes(image), "image/png")})
    assert r.status_code == 200, r.text
    ys, xs = np.nonzero(mask)
    r = client.post(f"/infer/multiverseg?session_id={r.json()['session_id']}&output=image",
                    data={"params": json.dumps({"foreground": [[int(xs.mean()), int(ys.mean())]]})})
    assert r.status_code == 200, r.text
    assert np.asarray(Image.open(io.BytesIO(r.content))).shape == mask.shape


def test_a_save_killed_midway_leaves_a_datastore_that_starts(tmp_path):
    """What a kill during a save can leave behind (a partial label or datastore_v2.json under their temporary
    names) neither breaks the next start nor shows up as a label."""
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
    from monailabel.config import settings

    from mvlabel.localstore import CheckedDatastore

    studies = make_studies(tmp_path / "studies", IDS[:2])
    store = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
    label = tmp_path / "l.png"
    label.write_bytes(png_bytes(hc18_pair(IDS[0])[1].astype(np.uint8)))
    store.save_label(IDS[0], str(label), "final", {})
    saved = (studies / "labels" / "final" / f"{IDS[0]}.png").read_bytes()
    (studies / "labels" / "final" / f".{IDS[1]}.png.half.tmp").write_bytes(b"\x89PNG\r\n")  # killed mid-copy
    (studies / ".datastore_v2.json.half.tmp").write_text('{"name": "tru')  # killed mid-write
    again = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
    assert again.get_labeled_images() == [IDS[0]]
    assert open(again.get_label_uri(IDS[0], "final"), "rb").read() == saved


def test_history_keeps_the_newest_labels_it_is_told_to(tmp_path):
    """``--conf history_keep N``: each image's history holds its N newest earlier labels, in the order they
    were replaced, also when many saves fall in one second (names never reused); a deletion prunes too."""
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
    from monailabel.config import settings

    from mvlabel.localstore import CheckedDatastore

    studies = make_studies(tmp_path / "studies", IDS[:1])
    store = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
    store.history_keep = 2
    mask = hc18_pair(IDS[0])[1].astype(np.uint8)
    versions = [png_bytes(np.roll(mask, shift, axis=1)) for shift in range(6)]
    for version in versions:
        (tmp_path / "l.png").write_bytes(version)
        store.save_label(IDS[0], str(tmp_path / "l.png"), "final", {})
    kept = [open(h["file"], "rb").read() for h in store.label_history(IDS[0])]
    assert kept == versions[3:5]  # versions 0-2 pruned, version 5 is the current label
    store.remove_label(IDS[0], "final")
    assert [open(h["file"], "rb").read() for h in store.label_history(IDS[0])] == versions[4:]
    assert len(os.listdir(studies / "labels" / "final" / ".history" / IDS[0])) == 4  # 2 labels, 2 records


def test_another_process_writing_the_index_loses_nothing(tmp_path):
    """The batch pre-segmenter (another process) saves a label and edits an image's info while the server's
    datastore holds the index in memory; the server's next save keeps both (MONAI Label wrote its stale copy
    over the index: the other label came back only as a bare record, its info gone)."""
    import subprocess
    import sys

    from .conftest import ROOT

    app = ROOT / "apps" / "multiverseg"
    sys.path.insert(0, str(app))
    from monailabel.config import settings

    from mvlabel.localstore import CheckedDatastore

    def opened():
        return CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)

    studies = make_studies(tmp_path / "studies", IDS[:2])
    for i, key in enumerate(IDS[:2]):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(hc18_pair(key)[1].astype(np.uint8)))
    server = opened()
    other = f"""
import sys
sys.path.insert(0, {str(app)!r})
from monailabel.config import settings
from mvlabel.localstore import CheckedDatastore
store = CheckedDatastore({str(studies)!r}, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
store.save_label({IDS[1]!r}, {str(tmp_path / "1.png")!r}, "original", {{"model": "batch"}})
store.update_image_info({IDS[0]!r}, {{"scored": 1}})
"""
    subprocess.run([sys.executable, "-c", other], check=True, timeout=120)
    server.save_label(IDS[0], str(tmp_path / "0.png"), "final", {"model": "user"})
    server.update_label_info(IDS[0], "final", {"checked": True})
    server.set_description("fetal heads")

    for store in (server, opened()):
        assert store.get_label_info(IDS[1], "original")["model"] == "batch"
        assert store.get_image_info(IDS[0])["scored"] == 1
        assert store.get_label_info(IDS[0], "final")["model"] == "user"
        assert store.get_label_info(IDS[0], "final")["checked"] is True
        assert store.description() == "fetal heads"


def test_the_server_sees_labels_another_process_saved(tmp_path):
    """Labels and the index are renamed into place; the server's folder watcher takes a rename for the change
    it is (MONAI Label's watched created and modified files only, so the pre-segmenter's labels stayed unseen
    until the server next wrote the index itself)."""
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
    from monailabel.config import settings

    from mvlabel.localstore import CheckedDatastore

    studies = make_studies(tmp_path / "studies", IDS[:2])
    server = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=True)
    try:
        other = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
        (tmp_path / "l.png").write_bytes(png_bytes(hc18_pair(IDS[1])[1].astype(np.uint8)))
        other.save_label(IDS[1], str(tmp_path / "l.png"), "original", {"model": "batch"})
        deadline = time.monotonic() + 10
        while IDS[1] not in server.get_labeled_images("original") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.get_label_info(IDS[1], "original")["model"] == "batch"
    finally:
        server._observer.stop()
        server._observer.join(10)


def test_an_unreadable_index_is_replaced_by_the_next_write(tmp_path):
    """An index another program left unreadable does not block saves: the server's copy stays and its next
    write puts a whole index back, with the new record."""
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
    from monailabel.config import settings

    from mvlabel.localstore import CheckedDatastore

    studies = make_studies(tmp_path / "studies", IDS[:2])
    store = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
    index = studies / "datastore_v2.json"
    index.write_text(index.read_text()[:50])
    (tmp_path / "l.png").write_bytes(png_bytes(hc18_pair(IDS[0])[1].astype(np.uint8)))
    store.save_label(IDS[0], str(tmp_path / "l.png"), "final", {"model": "user"})
    again = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
    assert again.get_label_info(IDS[0], "final")["model"] == "user" and sorted(again.list_images()) == IDS[:2]


def test_processes_saving_at_once_keep_every_record(tmp_path):
    """Three processes, each holding the index as it was before any of them saved, save labels of the same
    images under three tags at the same time: the index ends with every one of them, each with its last
    info (MONAI Label's writes lost about two thirds)."""
    import subprocess
    import sys

    from .conftest import ROOT

    app = ROOT / "apps" / "multiverseg"
    sys.path.insert(0, str(app))
    from monailabel.config import settings

    from mvlabel.localstore import CheckedDatastore

    ids = hc18_ids(6, start=20)
    studies = make_studies(tmp_path / "studies", ids)
    for i, key in enumerate(ids):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(hc18_pair(key)[1].astype(np.uint8)))
    writer = f"""
import sys
sys.path.insert(0, {str(app)!r})
from monailabel.config import settings
from mvlabel.localstore import CheckedDatastore
store = CheckedDatastore({str(studies)!r}, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
import os, time
open({str(tmp_path)!r} + "/ready-" + sys.argv[1], "w").close()
deadline = time.monotonic() + 120
while not os.path.exists({str(tmp_path)!r} + "/go") and time.monotonic() < deadline:
    time.sleep(0.01)
for round in range(2):
    for i, key in enumerate({ids!r}):
        store.save_label(key, {str(tmp_path)!r} + f"/{{i}}.png", sys.argv[1], {{"round": round}})
"""
    tags = ("final", "original", "batch")
    writers = [subprocess.Popen([sys.executable, "-c", writer, tag]) for tag in tags]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{tag}").exists() for tag in tags) and time.monotonic() < deadline:
            time.sleep(0.05)  # every writer has read the index: all of them start from the same one
        (tmp_path / "go").touch()
        assert [w.wait(timeout=300) for w in writers] == [0, 0, 0]
    finally:
        for w in writers:
            w.kill()
    store = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
    assert {(key, tag): store.get_label_info(key, tag).get("round") for key in ids for tag in tags} == {
        (key, tag): 1 for key in ids for tag in tags
    }


# -- MONAI Label's own routes: what it would overwrite, leave behind or answer with a 500 -----------------


def test_an_image_upload_never_replaces_a_datastore_image(server):
    """MONAI Label's upload replaces an image of the same id and drops its labels' records."""
    client, app, studies = server
    before, info = final_bytes(studies), app.datastore().get_label_info(IDS[0], "final")
    small = png_bytes(np.zeros((20, 20), np.uint8))
    for url, name in ((f"/datastore/image?image={IDS[0]}", "x.png"), ("/datastore/image", f"{IDS[0]}.png")):
        r = client.put(url, data={"params": "{}"}, files={"file": (name, small, "image/png")})
        assert r.status_code == 409 and "already" in r.json()["detail"], r.text
    assert final_bytes(studies) == before and app.datastore().get_label_info(IDS[0], "final") == info
    assert Image.open(app.datastore().get_image_uri(IDS[0])).size != (20, 20)


@pytest.mark.parametrize("filename", [".hidden.png", "a b;c|d.png", "s\u00e9rie?.png"])
def test_an_image_id_taken_from_the_file_name_is_a_name(server, filename):
    client, _, studies = server
    files = tree(studies.parent)
    r = client.put("/datastore/image", data={"params": "{}"},
                   files={"file": (filename, png_bytes(np.zeros((8, 8), np.uint8)), "image/png")})
    assert r.status_code == 422 and "name" in r.json()["detail"], r.text
    assert tree(studies.parent) == files


@pytest.mark.parametrize("route, info", [
    (f"/datastore/label/info?label={IDS[0]}&tag=final", {"ts": "garbage"}),
    (f"/datastore/label/info?label={IDS[0]}&tag=final", {"name": "../x"}),
    (f"/datastore/label/info?label={IDS[0]}&tag=final", {"label_info": "junk"}),
    (f"/datastore/label/info?label={IDS[0]}&tag=final", {"label_info": [{"name": "a", "idx": 1}, {"name": "b", "idx": 1}]}),
    (f"/datastore/image/info?image={IDS[1]}", {"strategy": "junk"}),
    (f"/datastore/image/info?image={IDS[1]}", {"mvseg_scores": []}),
])
def test_info_edits_leave_what_the_server_records_alone(server, route, info):
    client, app, _ = server
    r = client.put(route, data={"info": json.dumps(info)})
    assert r.status_code == 422, r.text
    assert client.post("/activelearning/random", json={}).status_code == 200
    _, mask = hc18_pair(IDS[0])
    assert put_label(client, IDS[0], mask).status_code == 200


def test_a_label_info_edited_by_hand_does_not_block_the_next_save(server):
    client, app, studies = server
    app.datastore().update_label_info(IDS[0], "final", {"ts": "garbage"})  # e.g. datastore_v2.json by hand
    _, mask = hc18_pair(IDS[0])
    assert put_label(client, IDS[0], mask).status_code == 200
    assert app.datastore().label_history(IDS[0])[-1]["info"]["ts"] == "garbage"


def test_refused_uploads_and_archives_leave_nothing_in_the_temp_folder(server, tmp_path, monkeypatch):
    import tempfile

    client, _, studies = server
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _, mask = hc18_pair(IDS[1])
    assert put_label(client, IDS[1], np.zeros((5, 5), np.uint8)).status_code == 422  # wrong shape
    assert put_label(client, IDS[1], mask, name="label.nii.gz").status_code == 422  # not a NIfTI
    r = client.put("/datastore/image?image=new_one", data={"params": "{}"},
                   files={"file": ("x.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")})
    assert r.status_code == 200
    r = client.put("/datastore/image?image=new_one", data={"params": "{}"},
                   files={"file": ("x.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")})
    assert r.status_code == 409
    for _ in range(2):
        r = client.get("/datastore/dataset")
        assert r.status_code == 200 and r.content[:2] == b"PK"
    assert os.listdir(tmp_path) == []
    assert os.listdir(studies / ".archive") == ["dataset.zip"]
    assert client.delete("/datastore/image?id=new_one").status_code == 200


def test_a_label_with_fractional_values_is_refused(server):
    import nibabel as nib

    client, app, studies = server
    before = final_bytes(studies)
    image, _ = hc18_pair(IDS[0])
    path = studies.parent / "half.nii.gz"
    nib.save(nib.Nifti1Image(np.full(image.shape[::-1], 0.5, np.float32), np.eye(4)), str(path))
    r = client.put(f"/datastore/label?image={IDS[0]}&tag=final", data={"params": "{}"},
                   files={"label": ("half.nii.gz", path.read_bytes(), "application/octet-stream")})
    assert r.status_code == 422 and "whole numbers" in r.json()["detail"]
    assert final_bytes(studies) == before


def test_a_malformed_asap_label_is_refused(server):
    client, _, studies = server
    before = final_bytes(studies)
    xml = (b'<ASAP_Annotations><Annotations><Annotation Name="a" PartOfGroup="head"><Coordinates>'
           b'<Coordinate Order="0" X="-1e9" Y="abc"/></Coordinates></Annotation></Annotations></ASAP_Annotations>')
    r = client.put(f"/datastore/label?image={IDS[0]}&tag=final", data={"params": "{}"},
                   files={"label": ("label.xml", xml, "application/xml")})
    assert r.status_code == 422 and "not a number" in r.json()["detail"]
    assert final_bytes(studies) == before


@pytest.mark.parametrize("tag", ["Final", "FINAL"])
def test_final_in_another_case_is_not_a_tag(server, tag):
    client, _, studies = server
    r = put_label(client, IDS[1], hc18_pair(IDS[1])[1], tag=tag)
    assert r.status_code == 422 and "final" in r.json()["detail"]
    assert not (studies / "labels" / tag).exists()


@pytest.mark.parametrize("method, route, status", [
    ("post", "/batch/infer/nosuch", 404),
    ("post", "/train/nosuch", 404),
    ("post", "/train/", 404),  # this app trains nothing over HTTP
    ("post", "/scoring/nosuch", 404),
    ("put", "/model/multiverseg", 405),
    ("delete", "/model/multiverseg", 405),
    ("get", "/logs/?lines=99999999999999999999", 422),
    ("get", "/proxy/dicom/..%2f..%2fetc%2fpasswd", 404),
])
def test_routes_this_server_cannot_serve_say_so(server, method, route, status):
    client, _, _ = server
    kwargs = {"json": {}} if method == "post" else {}
    if method == "put":
        kwargs = {"files": {"file": ("m.pt", b"weights", "application/octet-stream")}}
    r = getattr(client, method)(route, **kwargs)
    assert r.status_code == status and r.json()["detail"], r.text
    assert client.post("/batch/infer/multiverseg_auto", json={"label_tag": "original", "images": "unlabeled"}
                       ).status_code != 429  # no dud job in the way


def test_a_session_holds_one_readable_image_inside_the_datastore(server):
    client, app, studies = server
    image, _ = hc18_pair(IDS[2])
    two = [("files", ("a.png", png_bytes(image), "image/png")), ("files", ("b.png", png_bytes(image), "image/png"))]
    assert client.put("/session/", files=two).status_code == 422
    r = client.put("/session/", files={"files": ("c.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")})
    assert r.status_code == 422
    r = client.post("/infer/multiverseg?session_id=nosuch&output=json", data={"params": '{"foreground": [[5, 5]]}'})
    assert r.status_code == 404 and "session" in r.json()["detail"]
    assert os.path.realpath(app.sessions().store_path) == os.path.realpath(studies / ".sessions")


def test_a_session_is_gone_when_it_expires_and_its_id_is_random(server):
    """MONAI Label served an expired session until its five-minute clean-up came by, and made ids from the
    clock and the MAC address (uuid1)."""
    import time
    import uuid

    client, app, studies = server
    upload = {"files": ("scan.png", png_bytes(hc18_pair(IDS[2])[0]), "image/png")}
    r = client.put("/session/?expiry=1", files=upload)
    assert r.status_code == 200, r.text
    session = r.json()["session_id"]
    assert uuid.UUID(session).version == 4
    time.sleep(2.1)
    r = client.post(f"/infer/multiverseg?session_id={session}&output=json", data={"params": "{}"})
    assert r.status_code == 404 and "session" in r.json()["detail"], r.text
    assert client.get(f"/session/{session}").status_code == 404
    assert not (studies / ".sessions" / session).exists()
    r = client.post(f"/infer/wsi/multiverseg?session_id={session}&output=json", json={"location": [0, 0]})
    assert r.status_code == 404 and "session" in r.json()["detail"], r.text


@pytest.mark.parametrize("name", [b"a\x00.png", b"x" * 300 + b".png", b"tab\tname.png"])
def test_a_session_file_name_the_disk_cannot_hold_is_refused(server, name):
    """Sent raw, as some clients do (httpx would percent-encode it): MONAI Label answered 500 and left an
    empty folder in the temp folder."""
    client, _, studies = server
    before = server_temp_files()
    body = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="' + name + b'"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png_bytes(hc18_pair(IDS[2])[0]) + b"\r\n--b--\r\n")
    r = client.put("/session/", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 422 and "file name" in r.json()["detail"], r.text
    assert server_temp_files() - before == set()


def test_a_detached_nrrd_header_reads_no_other_file(server):
    """An NRRD header names its data file; uploaded, it could make the server read any file it can."""
    client, app, _ = server
    header = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1344 1 1\nencoding: raw\ndata file: /etc/passwd\n\n"
    upload = {"file": ("p.nhdr", header, "application/octet-stream")}
    for r in (client.put("/datastore/image?image=p", data={"params": "{}"}, files=upload),
              client.post("/infer/multiverseg?output=json", data={"params": '{"foreground": [[0, 0, 0]]}'},
                          files=upload)):
        assert r.status_code == 422 and "data file" in r.json()["detail"], r.text
    assert not app.datastore().get_image_uri("p")


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_a_compressed_nrrd_that_holds_more_than_its_sizes_is_refused_before_it_is_inflated(server, encoding):
    """2 KB of bzip2 declaring 10 x 10 x 10 voxels inflated to 3 GB in the server before pynrrd compared the
    sizes (it answered 422 after 79 s, 5 GB larger). Sizes that are not positive are refused too."""
    import bz2
    import gzip

    client, app, _ = server
    zeros = b"\0" * (64 << 20)
    body = gzip.compress(zeros, 1) if encoding == "gzip" else bz2.compress(zeros, 1)
    header = f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 10 10 10\nencoding: {encoding}\n\n".encode()
    negative = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 10 -10 -10\nencoding: raw\n\n" + b"\0" * 1000
    for data, word in ((header + body, "more data than its sizes"), (negative, "must be positive")):
        r = client.put("/datastore/image?image=bomb", data={"params": "{}"},
                       files={"file": ("bomb.nrrd", data, "application/octet-stream")})
        assert r.status_code == 422 and word in r.json()["detail"], r.text
    assert not app.datastore().get_image_uri("bomb")


def test_an_image_no_network_can_read_never_breaks_next_sample(server):
    client, app, studies = server
    image = np.zeros((32, 32), np.float32)
    image[3, 3] = np.nan
    buf = io.BytesIO()
    Image.fromarray(image, "F").save(buf, format="TIFF")
    r = client.put("/datastore/image?image=nan_upload", data={"params": "{}"},
                   files={"file": ("nan.tif", buf.getvalue(), "image/tiff")})
    assert r.status_code == 422 and "NaN" in r.json()["detail"]
    (studies / "nan_copied.tif").write_bytes(buf.getvalue())  # copied into the folder by hand
    app.datastore().refresh()
    try:
        for strategy in ("nearest", "coverage", "random"):
            assert client.post(f"/activelearning/{strategy}", json={}).status_code == 200
    finally:
        assert client.delete("/datastore/image?id=nan_copied").status_code == 200


def test_an_image_the_network_fails_on_costs_only_its_own_score(server, monkeypatch):
    """One image whose forward failed (a 1 x 60000 image asked for 14 GB) made every scoring pass fail and
    next-sample answer 500 to everyone until the image was deleted."""
    import mvlabel.nextsample as nextsample

    client, app, studies = server
    Image.fromarray(np.full((40, 56), 90, np.uint8)).save(studies / "cursed.png")
    Image.fromarray(hc18_pair(IDS[0])[0]).save(studies / "plain.png")  # an image that can be scored
    app.datastore().refresh()
    cursed = lambda planes: any(p.shape == (40, 56) for p in planes)  # noqa: E731

    def prepare_image(plane, size):
        if plane.shape == (40, 56):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_prepare(plane, size)

    def entropy_scores(predictor, planes, context):
        if cursed(planes):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_entropy(predictor, planes, context)

    real_prepare, real_entropy = nextsample.prepare_image, nextsample.activelearning.entropy_scores
    monkeypatch.setattr(nextsample, "prepare_image", prepare_image)
    monkeypatch.setattr(nextsample.activelearning, "entropy_scores", entropy_scores)
    try:
        board = app.scoreboard
        board._descriptors.clear()
        board.score_all()
        scored = board.get(board.context.names[0], "uncertainty")
        assert scored and "cursed" not in scored
        for strategy in ("nearest", "coverage", "uncertainty"):
            r = client.post(f"/activelearning/{strategy}", json={"client_id": "one-client"})
            assert r.status_code == 200 and r.json()["id"] != "cursed", r.text
    finally:
        for image in ("cursed", "plain"):
            assert client.delete(f"/datastore/?id={image}").status_code == 200


@pytest.mark.parametrize("route, body", [
    ("/activelearning/random", {"client_id": "x" * 5000}),
    ("/activelearning/random", {"client_id": {"a": 1}}),
    ("/activelearning/random", {"x": [[[[[[[[[[[]]]]]]]]]]]}),
])
def test_next_sample_params_are_checked(server, route, body):
    client, app, studies = server
    size = (studies / "datastore_v2.json").stat().st_size
    deep = '{"x": ' + "[" * 5000 + "]" * 5000 + "}"
    r = client.post(route, content=json.dumps(body) if body.get("client_id") else deep,
                    headers={"content-type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["detail"], r.text
    assert (studies / "datastore_v2.json").stat().st_size < size + 1000


def test_an_uploads_params_cannot_set_what_the_server_records(server):
    client, app, _ = server
    r = client.put("/datastore/image?image=resv", data={"params": json.dumps({"strategy": "junk"})},
                   files={"file": ("x.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")})
    assert r.status_code == 422 and "strategy" in r.json()["detail"]
    assert not app.datastore().get_image_uri("resv")


def test_a_deleted_final_label_is_kept_and_a_missing_one_is_404(server):
    client, app, studies = server
    _, mask = hc18_pair(IDS[3])
    assert put_label(client, IDS[3], mask).status_code == 200
    current = (studies / "labels" / "final" / f"{IDS[3]}.png").read_bytes()
    assert client.delete(f"/datastore/label?id={IDS[3]}&tag=final").status_code == 200
    assert open(app.datastore().label_history(IDS[3])[-1]["file"], "rb").read() == current
    assert client.delete(f"/datastore/label?id={IDS[3]}&tag=final").status_code == 404
    assert client.delete("/datastore/label?id=nosuch&tag=final").status_code == 404
    assert put_label(client, IDS[3], mask).status_code == 200


def test_info_of_an_image_not_in_the_datastore_is_404(server):
    """MONAI Label answered 200 {} to reading the info of any id, deleted or never there."""
    client, _, _ = server
    assert client.get(f"/datastore/image/info?image={IDS[0]}").status_code == 200
    for url in ("/datastore/image/info?image=nosuch", "/datastore/label/info?label=nosuch&tag=final"):
        r = client.get(url)
        assert r.status_code == 404 and "not in the datastore: 'nosuch'" in r.json()["detail"], url
    r = client.put("/datastore/image/info?image=nosuch", data={"info": "{}"})
    assert r.status_code == 404


def test_label_values_over_255_are_refused(server):
    client, _, studies = server
    before = final_bytes(studies)
    _, mask = hc18_pair(IDS[0])
    r = put_label(client, IDS[0], Image.fromarray((mask > 0).astype(np.uint16) * 1000))
    assert r.status_code == 422 and "1..255" in r.json()["detail"]
    assert final_bytes(studies) == before


def test_refused_inference_leaves_no_upload_behind(server, tmp_path, monkeypatch):
    import tempfile

    client, _, _ = server
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    image, _ = hc18_pair(IDS[1])
    r = infer(client, IDS[1], {"foreground": [[5, 5]]}, files={"label": ("s.png", png_bytes(np.zeros((3, 3), np.uint8)))})
    assert r.status_code == 422  # a scribble map of the wrong shape
    r = client.post("/infer/multiverseg?output=json", data={"params": '{"foreground": [[99999, 5]]}'},
                    files={"file": ("x.png", png_bytes(image), "image/png")})
    assert r.status_code == 422  # a click outside the uploaded image
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("wsi", [{"location": [5]}, {"size": [5]}, {"size": ["a", 3]}, {"level": [1, 2]}])
def test_a_qupath_region_of_the_wrong_shape_is_422(server, wsi):
    client, _, _ = server
    r = client.post(f"/infer/wsi/multiverseg?image={IDS[1]}&output=asap", json=wsi)
    assert r.status_code == 422 and r.json()["detail"], r.text


def _region_click(key=IDS[1]):
    """A region of ``key`` around its head and a click at the head's centre, in image pixels."""
    ys, xs = np.nonzero(hc18_pair(key)[1])
    cx, cy = int(xs.mean()), int(ys.mean())
    return [max(cx - 150, 0), max(cy - 120, 0)], [300, 240], [cx, cy]


def test_successive_clicks_on_a_qupath_region_refine_it(server):
    """The state of a region request is the region's: the second click refines the first (before, each
    request cropped the region to a new temp file, and the state keyed on that file)."""
    client, _, _ = server
    location, size, click = _region_click()
    answers = []
    for points in ([click], [click, [click[0] + 40, click[1]]]):
        region = {"location": location, "size": size, "params": {"foreground": points, "client_id": "qp"}}
        r = client.post(f"/infer/wsi/multiverseg?image={IDS[1]}&output=json", json=region)
        assert r.status_code == 200, r.text
        answers.append(r.json()["refined"])
    assert answers == [False, True]


@pytest.mark.parametrize("mode", ["F", "I"])
def test_a_region_of_a_float_or_int32_image(server, mode, tmp_path):
    """A region of a float32 or int32 TIFF answered 500 (it was cropped to a PNG, which holds neither) and
    left an empty file in the temp folder."""
    client, _, _ = server
    image = hc18_pair(IDS[1])[0].astype(np.float32 if mode == "F" else np.int32) * 3
    buf = io.BytesIO()
    Image.fromarray(image, mode).save(buf, format="TIFF")
    name = f"deep_{mode}"
    r = client.put(f"/datastore/image?image={name}", data={"params": "{}"},
                   files={"file": (f"{name}.tif", buf.getvalue(), "image/tiff")})
    assert r.status_code == 200, r.text
    before = server_temp_files()
    location, size, click = _region_click()
    r = client.post(f"/infer/wsi/multiverseg?image={name}&output=asap",
                    json={"location": location, "size": size, "params": {"foreground": [click]}})
    assert r.status_code == 200 and b"Coordinate" in r.content, r.text
    assert server_temp_files() - before == set()


@pytest.mark.parametrize("params, word", [({"min_poly_area": "abc"}, "min_poly_area"), ({"min_poly_area": -1}, "min_poly_area"),
                                          ({"color": 5}, "color"), ({"color": None}, "color"),
                                          ({"color": "\u0001\"<x>"}, "color")])
def test_a_region_answer_is_drawn_only_as_asked_right(server, params, word):
    """These answered 500, or XML that is not well-formed, and left a partial file in the temp folder."""
    client, _, _ = server
    location, size, click = _region_click()
    before = server_temp_files()
    r = client.post(f"/infer/wsi/multiverseg?image={IDS[1]}&output=asap",
                    json={"location": location, "size": size, "params": {"foreground": [click], **params}})
    assert r.status_code == 422 and word in r.json()["detail"], r.text
    assert server_temp_files() - before == set()


def test_the_zero_click_model_answers_a_qupath_region_with_polygons(server):
    """multiverseg_auto answered QuPath's region request with a PNG of the whole image."""
    import xml.etree.ElementTree as ET

    client, _, _ = server
    location, size, _ = _region_click()
    r = client.post(f"/infer/wsi/multiverseg_auto?image={IDS[1]}&output=asap",
                    json={"location": location, "size": size})
    assert r.status_code == 200 and r.headers["content-type"].startswith(("application/xml", "text/xml")), r.text
    coords = np.array([(float(c.get("X")), float(c.get("Y"))) for c in ET.fromstring(r.content).iter("Coordinate")])
    assert len(coords) and {a.get("PartOfGroup") for a in ET.fromstring(r.content).iter("Annotation")} <= {"head"}
    assert (coords >= np.array(location) - 1).all() and (coords <= np.array(location) + size + 1).all()


def test_a_mask_with_a_hole_survives_the_asap_round_trip(tmp_path):
    """A ring was written as two outlines, which QuPath imports as two filled annotations: it is now one
    polygon with a cut into its hole. Polygons written apart are joined, even one inside another (an earlier
    result inside a later one, nuclei inside a tissue outline)."""
    import sys
    import xml.etree.ElementTree as ET

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
    from mvlabel.imageio import read_asap, write_asap
    from mvlabel.wsi import polygons

    yy, xx = np.mgrid[:120, :140]
    r = np.hypot(yy - 60, xx - 70)
    ring = (r < 40) & (r >= 20)
    island = r < 8  # an island inside the hole stays filled
    mask = ring | island
    path = write_asap({"head": polygons(mask, (0, 0), 0)}, {"head": "#00FF00"}, str(tmp_path / "a.xml"))
    assert len(list(ET.parse(path).getroot().iter("Annotation"))) == 2  # the ring (with its cut), the island
    back = read_asap(path, mask.shape, default_name="head")["head"]
    assert (back & mask).sum() / (back | mask).sum() > 0.97
    assert not back[60, 70 - 14] and back[60, 70] and back[60, 70 - 30]
    inner, outer = r < 10, (abs(yy - 60) < 30) & (abs(xx - 70) < 30)  # written apart, one inside the other
    path = write_asap({"head": polygons(outer, (0, 0), 0) + polygons(inner, (0, 0), 0)}, {"head": "#00FF00"},
                      str(tmp_path / "b.xml"))
    back = read_asap(path, mask.shape, default_name="head")["head"]
    assert back[60, 70] and (back & outer).sum() / (back | outer).sum() > 0.97


def test_a_qupath_round_trip_of_many_polygons_is_one_label(server):
    """QuPath names each imported annotation's class after its Name and writes that class back as its
    group: the answer's polygons were named 'head 0', 'head 1', ..., so a save of 17 of them was refused as
    17 labels, and none of them was 'head'."""
    import xml.etree.ElementTree as ET

    client, app, studies = server
    shape = hc18_pair(IDS[3])[0].shape
    blobs = np.zeros(shape, bool)
    for k in range(20):
        blobs[20 + 25 * (k // 5) : 35 + 25 * (k // 5), 20 + 25 * (k % 5) : 35 + 25 * (k % 5)] = True
    from mvlabel.imageio import write_asap
    from mvlabel.wsi import polygons

    path = write_asap({"head": polygons(blobs, (0, 0), 0)}, {"head": "#00FF00"})
    answer = ET.parse(path)
    os.unlink(path)
    for ann in answer.getroot().iter("Annotation"):  # what QuPath sends back: class = the Name it imported
        ann.set("PartOfGroup", ann.get("Name"))
    back = ET.tostring(answer.getroot())
    r = client.put(f"/datastore/label?image={IDS[3]}&tag=final", data={"params": "{}"},
                   files={"label": ("label.xml", back, "application/xml")})
    assert r.status_code == 200, r.text
    app.context.refresh()
    assert any(key[0] == IDS[3] for key in app.context.get("head").ids())


@pytest.mark.parametrize("groups, status, word", [
    (["a/b"], 422, "not a label name"),
    ([f"g{i}" for i in range(17)], 422, "at most"),
])
def test_an_asap_label_is_checked_like_every_label(server, groups, status, word):
    client, _, studies = server
    before = final_bytes(studies)
    anns = "".join(f'<Annotation Name="x" PartOfGroup="{g}"><Coordinates><Coordinate X="1" Y="1"/>'
                   f'<Coordinate X="30" Y="1"/><Coordinate X="30" Y="30"/></Coordinates></Annotation>' for g in groups)
    xml = f"<ASAP_Annotations><Annotations>{anns}</Annotations></ASAP_Annotations>".encode()
    r = client.put(f"/datastore/label?image={IDS[0]}&tag=final", data={"params": "{}"},
                   files={"label": ("label.xml", xml, "application/xml")})
    assert r.status_code == status and word in r.json()["detail"], r.text
    assert final_bytes(studies) == before


def test_batch_inference_runs_on_a_cpu_server(server):
    """MONAI Label's batch task spread images over CUDA devices and divided by zero without one."""
    client, _, studies = server
    r = client.post("/batch/infer/multiverseg_auto?run_sync=true", json={"label_tag": "b1", "images": [IDS[1]]})
    assert r.status_code == 200, r.text
    assert (studies / "labels" / "b1" / f"{IDS[1]}.png").exists()
    for images in (5, ["../../etc/passwd"], [3]):
        r = client.post("/batch/infer/multiverseg_auto?run_sync=true", json={"label_tag": "b1", "images": images})
        assert r.status_code == 422 and "images" in r.json()["detail"], r.text
    # an image the datastore does not have started a job that failed in the background
    r = client.post("/batch/infer/multiverseg_auto", json={"label_tag": "b2", "images": [IDS[1], "no_such_image"]})
    assert r.status_code == 404 and "'no_such_image'" in r.json()["detail"], r.text
    assert not (studies / "labels" / "b2").exists()
    r = client.post("/batch/infer/multiverseg_auto", json={"label_tag": "b2", "images": []})
    assert r.status_code == 422, r.text  # it ran a whole job for nothing


def test_a_colour_label_is_refused_not_read_as_empty(server):
    client, _, studies = server
    before = final_bytes(studies)
    _, mask = hc18_pair(IDS[0])
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[..., 1] = (mask > 0) * 255  # the mask in green
    rgba[..., 3] = 255
    r = put_label(client, IDS[0], Image.fromarray(rgba, "RGBA"))
    assert r.status_code == 422 and "grey labelmap" in r.json()["detail"]
    assert final_bytes(studies) == before


def _label_image(kind: str, mask: np.ndarray) -> Image.Image:
    """``mask`` (0/1) as a tool exports it."""
    if kind == "rgb of equal channels":
        return Image.fromarray(np.repeat(mask[..., None], 3, axis=2))
    if kind == "1-bit":
        return Image.fromarray(mask.astype(bool))
    if kind == "0/255":
        return Image.fromarray(mask * 255)
    im = Image.fromarray(mask, "P")  # palette: the index is the value, whatever colour it shows
    im.putpalette({"palette, labelme colours": [0, 0, 0, 128, 0, 0], "palette, white": [0, 0, 0, 255, 255, 255],
                   "palette, greys": [0, 0, 0, 1, 1, 1]}[kind] + [0] * 762)
    return im


@pytest.mark.parametrize("kind", ["rgb of equal channels", "1-bit", "0/255", "palette, labelme colours",
                                  "palette, white", "palette, greys"])
def test_a_2d_label_as_tools_export_it_is_saved_and_joins_the_context(server, kind):
    """RGB and palette labels answered 500 (and one on disk failed every click); a palette label was read as
    its colours; a 0/255 or 1-bit label saved with label_info idx 1 was stored and never used."""
    from mvlabel.contextstore import label_masks
    from mvlabel.imageio import read_image, read_label

    client, app, _ = server
    image, mask = hc18_pair(IDS[1])
    if not app.datastore().get_image_uri("exported"):
        r = client.put("/datastore/image?image=exported", data={"params": "{}"},
                       files={"file": ("exported.png", png_bytes(image), "image/png")})
        assert r.status_code == 200, r.text
    mask = (mask > 0).astype(np.uint8)
    info = {"label_info": [{"name": "head", "idx": 1}]}
    r = put_label(client, "exported", _label_image(kind, mask), params=json.dumps(info))
    assert r.status_code == 200, r.text
    stored = read_label(app.datastore().get_label_uri("exported", "final"),
                        read_image(app.datastore().get_image_uri("exported")))
    masks = label_masks(stored, info, ["head", "skull"])
    assert list(masks) == ["head"] and np.array_equal(masks["head"], mask > 0)
    assert infer(client, IDS[2], {"foreground": [[100, 100]], "label_name": "head"}).status_code == 200


def test_2d_labels_that_would_be_stored_wrong_are_refused(server, tmp_path):
    client, _, studies = server
    before = final_bytes(studies)
    _, mask = hc18_pair(IDS[0])
    r = put_label(client, IDS[0], Image.fromarray((mask > 0).astype(np.uint8) * 255), name="label.jpg")
    assert r.status_code == 415 and "losslessly" in r.json()["detail"], r.text  # JPEG changes the values
    r = put_label(client, IDS[0], (mask > 0).astype(np.uint8) * 3, params=json.dumps(
        {"label_info": [{"name": "head", "idx": 1}]}))
    assert r.status_code == 422 and "names none of the label's values (3)" in r.json()["detail"], r.text
    assert final_bytes(studies) == before
    pages = [Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (10, 20, 30)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    r = client.put("/datastore/image?image=stack", data={"params": "{}"},
                   files={"file": ("stack.tif", buf.getvalue(), "image/tiff")})
    assert r.status_code == 422 and "3 pages" in r.json()["detail"], r.text  # not its first page alone


def test_a_label_the_context_cannot_read_never_fails_a_click(server, monkeypatch):
    from mvlabel import contextstore

    client, _, _ = server

    def broken(path, like):
        raise IndexError("a reader's own bug")

    monkeypatch.setattr(contextstore, "read_label", broken)
    _, mask = hc18_pair(IDS[2])
    assert put_label(client, IDS[2], (mask > 0).astype(np.uint8)).status_code == 200  # new: read again
    r = infer(client, IDS[1], {"foreground": [[100, 100]], "label_name": "head", "client_id": "unreadable"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("error", [28, 27, 30], ids=["disk full", "file size limit", "read-only"])
def test_a_disk_that_refuses_writes_gets_a_clear_answer_and_loses_nothing(server, tmp_path, monkeypatch, error):
    """A full or read-only disk answered a bare 500; a save whose index write failed had already replaced
    the label file (index and file then disagreed), an upload left a truncated image the watcher registered,
    a click's result file stayed in the temp folder."""
    import errno
    import tempfile

    from mvlabel import imageio

    client, app, studies = server
    store = app.datastore()
    monkeypatch.setattr(store, "update_images_info", lambda infos: None)  # the background scorer's index writes
    with store._index():  # one in progress ends first
        pass
    before = (final_bytes(studies), (studies / "datastore_v2.json").read_bytes(), store.get_label_info(IDS[0], "final"),
              len(store.label_history(IDS[0])))
    images = set(os.listdir(studies))
    status = 503 if error == errno.EROFS else 507

    def refuse(*args, **kwargs):
        raise OSError(error, os.strerror(error), str(studies / "datastore_v2.json"))

    monkeypatch.setattr(store, "_update_datastore_file", refuse)  # the index: the last write of a save or upload
    _, mask = hc18_pair(IDS[0])
    r = put_label(client, IDS[0], (mask > 0).astype(np.uint8))
    assert r.status_code == status and "nothing was saved" in r.json()["detail"], r.text
    assert str(studies) not in r.text  # no path in the answer
    r = client.put("/datastore/image?image=refused", data={"params": "{}"},
                   files={"file": ("refused.png", png_bytes(np.full((32, 32), 9, np.uint8)), "image/png")})
    assert r.status_code == status, r.text
    assert (final_bytes(studies), (studies / "datastore_v2.json").read_bytes(),
            store.get_label_info(IDS[0], "final"), len(store.label_history(IDS[0]))) == before
    assert set(os.listdir(studies)) == images and not store.get_image_uri("refused")

    monkeypatch.setattr(imageio, "_write_result", refuse)  # the temp folder fills during a click
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = infer(client, IDS[1], {"foreground": [[100, 100]], "label_name": "head"}, output="image")
    assert r.status_code == status, r.text
    assert not list(tmp_path.glob("mvseg-*"))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # an upload is checked from a copy in the temp folder
    r = client.put("/datastore/image?image=refused", data={"params": "{}"},
                   files={"file": ("refused.png", png_bytes(np.full((32, 32), 9, np.uint8)), "image/png")})
    assert r.status_code == status, r.text

    (studies / "by_hand.png").write_bytes(png_bytes(np.full((32, 32), 7, np.uint8)))  # copied in meanwhile
    store._reconcile_datastore()  # the folder watcher's call: it raised, and its thread died for good
    assert store.get_image_uri("by_hand")  # served from memory

    monkeypatch.undo()  # space is back: the same server saves again
    os.unlink(studies / "by_hand.png")
    store._reconcile_datastore()
    assert not store.get_image_uri("by_hand")
    changed = (mask > 0).astype(np.uint8)
    changed[0, 0] = 1
    assert put_label(client, IDS[0], changed).status_code == 200
    assert final_bytes(studies) != before[0]
    assert put_label(client, IDS[0], hc18_pair(IDS[0])[1]).status_code == 200  # as the other tests expect it


def test_a_body_cut_off_by_a_client_that_went_away_is_not_run(server):  # the app puts mvlabel on the path
    """A client that disconnected mid-upload had its cut body run as a request with defaults: a click
    without its prompts, a QuPath region of the default 2048 x 2048."""
    import asyncio

    from mvlabel.guard import Guard

    ran, answered = [], []

    async def inner(scope, receive, send):
        ran.append(scope["path"])

    messages = iter([{"type": "http.request", "body": b"--x\r\nContent-Disposition: form-data; name=", "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        answered.append(message)

    guard = Guard(inner, None, lambda path: None, lambda image: True, 1 << 20)
    scope = {"type": "http", "method": "POST", "path": "/infer/multiverseg", "query_string": b"image=x",
             "headers": [(b"content-type", b"multipart/form-data; boundary=x")]}
    asyncio.run(guard(scope, receive, send))
    assert not ran and answered[0]["status"] == 400


def test_a_volume_without_a_geometry_is_refused(server, tmp_path):
    import nrrd

    client, app, _ = server
    path = tmp_path / "flat.nrrd"
    nrrd.write(str(path), np.zeros((8, 8, 4), np.int16), {"space": "left-posterior-superior", "space origin": [0, 0, 0],
                                                           "space directions": [[1, 0, 0], [0, 0, 0], [0, 0, 1]]})
    r = client.put("/datastore/image?image=flat", data={"params": "{}"},
                   files={"file": ("flat.nrrd", path.read_bytes(), "application/octet-stream")})
    assert r.status_code == 422 and "geometry" in r.json()["detail"], r.text
    assert not app.datastore().get_image_uri("flat")


def test_a_volume_label_on_another_grid_is_refused_and_one_on_the_image_grid_saved(server, tmp_path):
    """A label of the right shape but another voxel size was stored as if it lay on the image's grid; the same
    grid written the way Slicer writes it (NRRD, LPS space) is accepted."""
    import nibabel as nib
    import nrrd

    client, app, studies = server
    affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
    volume = np.random.default_rng(0).integers(0, 200, (12, 10, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "vol.nii.gz"))
    r = client.put("/datastore/image?image=vol", data={"params": "{}"},
                   files={"file": ("vol.nii.gz", (tmp_path / "vol.nii.gz").read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    label = np.zeros(volume.shape, np.uint8)
    label[3:8, 2:7, 1:4] = 1

    def save(name: str, content: bytes):
        return client.put("/datastore/label?image=vol&tag=final", data={"params": json.dumps({"label_info": [
            {"name": "head", "idx": 1}]})}, files={"label": (name, content, "application/octet-stream")})

    coarse = affine.copy()
    coarse[:3, :3] *= 1.5
    nib.save(nib.Nifti1Image(label, coarse), str(tmp_path / "coarse.nii.gz"))
    r = save("coarse.nii.gz", (tmp_path / "coarse.nii.gz").read_bytes())
    detail = r.json()["detail"]
    assert r.status_code == 422 and "not on the image's grid" in detail and "voxel size 3" in detail
    assert not app.datastore().get_label_uri("vol", "final")

    lps = np.diag([-1.0, -1, 1]) @ affine[:3]  # RAS -> LPS, as Slicer writes it
    nrrd.write(str(tmp_path / "slicer.nrrd"), label, {"space": "left-posterior-superior",
                                                      "space directions": lps[:, :3].T, "space origin": lps[:, 3]})
    r = save("slicer.nrrd", (tmp_path / "slicer.nrrd").read_bytes())
    assert r.status_code == 200, r.text
    saved, _ = nrrd.read(app.datastore().get_label_uri("vol", "final"))
    np.testing.assert_array_equal(saved, label)

    # a volume whose header does not place it (no qform, no sform) is placed differently by every reader:
    # ITK (Slicer) puts it at the origin, nibabel centres it; its label is not compared
    nib.save(nib.Nifti1Image(volume, None), str(tmp_path / "bare.nii.gz"))
    r = client.put("/datastore/image?image=bare", data={"params": "{}"},
                   files={"file": ("bare.nii.gz", (tmp_path / "bare.nii.gz").read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    nib.save(nib.Nifti1Image(label, np.diag([-1.0, -1, 1, 1])), str(tmp_path / "itk.nii.gz"))  # ITK's placing
    r = client.put("/datastore/label?image=bare&tag=final", data={"params": "{}"},
                   files={"label": ("itk.nii.gz", (tmp_path / "itk.nii.gz").read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text

    # a click's NRRD answer (what Slicer asks for) lies where Slicer shows that image: ITK's placing
    import SimpleITK as sitk

    r = client.post("/infer/multiverseg?image=bare&output=image", data={"params": json.dumps({
        "foreground": [[5, 5, 3]], "background": [], "label_name": "head", "result_extension": ".nrrd"})})
    assert r.status_code == 200, r.text
    (tmp_path / "answer.nrrd").write_bytes(r.content)
    shown, answer = sitk.ReadImage(str(tmp_path / "bare.nii.gz")), sitk.ReadImage(str(tmp_path / "answer.nrrd"))
    for placing in ("GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(answer, placing)() == pytest.approx(getattr(shown, placing)()), placing


def test_a_nifti_whose_sform_and_qform_differ_takes_labels_and_answers_as_slicer_places_it(server, tmp_path):
    """nibabel places such a NIfTI by its sform, ITK (Slicer) by its qform when the sform's code is 2-4: the
    label Slicer saves (ITK's placing) was refused as 'not on the image's grid', the NRRD answer lay beside
    the image in Slicer."""
    import nibabel as nib
    import nrrd
    import SimpleITK as sitk

    client, app, _ = server
    volume = np.random.default_rng(2).integers(0, 200, (12, 10, 6)).astype(np.int16)
    qform, sform = np.diag([-2.0, 2, 2, 1]), np.diag([-2.0, 2, 2, 1])
    qform[:3, 3], sform[:3, 3] = [10, 20, 30], [11, 25, 33]
    img = nib.Nifti1Image(volume, None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    nib.save(img, str(tmp_path / "qs.nii.gz"))
    r = client.put("/datastore/image?image=qs", data={"params": "{}"},
                   files={"file": ("qs.nii.gz", (tmp_path / "qs.nii.gz").read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    shown = sitk.ReadImage(str(tmp_path / "qs.nii.gz"))
    label = np.zeros(volume.shape, np.uint8)
    label[3:8, 2:7, 1:4] = 1
    slicer = sitk.GetImageFromArray(label.transpose(2, 1, 0))  # as Slicer writes it: ITK's placing, LPS
    slicer.CopyInformation(shown)
    sitk.WriteImage(slicer, str(tmp_path / "slicer.nrrd"))
    r = client.put("/datastore/label?image=qs&tag=final", data={"params": "{}"},
                   files={"label": ("slicer.nrrd", (tmp_path / "slicer.nrrd").read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(nrrd.read(app.datastore().get_label_uri("qs", "final"))[0], label)

    r = client.post("/infer/multiverseg?image=qs&output=image", data={"params": json.dumps({
        "foreground": [[5, 5, 3]], "background": [], "label_name": "head", "result_extension": ".nrrd"})})
    assert r.status_code == 200, r.text
    (tmp_path / "answer.nrrd").write_bytes(r.content)
    answer = sitk.ReadImage(str(tmp_path / "answer.nrrd"))
    for placing in ("GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(answer, placing)() == pytest.approx(getattr(shown, placing)()), placing

    elsewhere = sform.copy()  # a label on neither placing is still refused
    elsewhere[:3, 3] += 7
    nib.save(nib.Nifti1Image(label, elsewhere), str(tmp_path / "elsewhere.nii.gz"))
    r = client.put("/datastore/label?image=qs&tag=final", data={"params": "{}"}, files={"label": (
        "elsewhere.nii.gz", (tmp_path / "elsewhere.nii.gz").read_bytes(), "application/octet-stream")})
    assert r.status_code == 422 and "not on the image's grid" in r.text


def test_a_refusal_never_echoes_a_huge_input_back(server):
    client, _, _ = server
    r = infer(client, IDS[1], {"foreground": [[0] * 100_000], "background": [], "label_name": "head"})
    assert r.status_code == 422 and "coordinates" in r.json()["detail"]
    assert len(r.content) < 1000
    r = client.post("/batch/infer/multiverseg_auto", json={"label_tag": "b3", "max_workers": "x" * 100_000})
    assert r.status_code == 422 and len(r.content) < 1000
    for route in ("/activelearning/" + "s" * 50_000, f"/infer/multiverseg?image={IDS[1]}&output=" + "y" * 50_000):
        r = client.post(route, json={})
        assert r.status_code == 414 and len(r.content) < 1000
    r = client.post("/activelearning/" + "s" * 5_000, json={})
    assert r.status_code == 404 and len(r.content) < 1000


def test_a_2d_nrrd_with_an_origin_is_read(server, tmp_path):
    """Its two-value 'space origin' did not fit a 3D affine: 422 'could not broadcast'."""
    import nrrd

    client, app, _ = server
    image = np.random.default_rng(1).integers(0, 255, (40, 30)).astype(np.uint8)
    nrrd.write(str(tmp_path / "flat2d.nrrd"), image, {"space": "left-posterior", "space origin": [1.5, 2.0],
                                                      "space directions": [[0.5, 0], [0, 0.5]]})
    r = client.put("/datastore/image?image=flat2d", data={"params": "{}"},
                   files={"file": ("flat2d.nrrd", (tmp_path / "flat2d.nrrd").read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert app.datastore().get_image_uri("flat2d")


# -- found by the audit of stop 33 -------------------------------------------------------------------


def test_an_image_id_that_holds_its_extension_round_trips_and_the_watcher_stays_calm(server):
    """'scan.png' uploaded as a PNG is stored as scan.png.png; MONAI Label read that file back as 'scan', a
    record whose file never exists, and its folder watcher added and removed it many times a second."""
    client, app, studies = server
    image = png_bytes(np.full((16, 16), 90, np.uint8))
    for name in ("scan.png", "a.png_b"):
        r = client.put(f"/datastore/image?image={name}", data={"params": "{}"},
                       files={"file": ("x.png", image, "image/png")})
        assert r.status_code == 200, r.text
    datastore = app.datastore()
    writes, write = [], datastore._update_datastore_file
    datastore._update_datastore_file = lambda *args, **kwargs: writes.append(write(*args, **kwargs))
    try:
        datastore._reconcile_datastore()  # what the watcher runs on every change of the folder (the index too)
    finally:
        del datastore._update_datastore_file
    assert writes == []  # nothing added and removed again, so no write to set the watcher off once more
    assert {"scan.png", "a.png_b"} <= set(datastore.list_images()) and "scan" not in datastore.list_images()
    assert client.get("/datastore/image?image=scan.png").content == image
    for name in ("scan.png", "a.png_b"):
        assert client.delete(f"/datastore/image?id={name}").status_code == 200


def test_a_label_saved_after_its_image_was_deleted_is_refused(server, monkeypatch):
    """The deleted image's record stayed until the folder watcher noticed: a save meanwhile was stored, and
    its file stayed behind for a new image of the same id to take as its own final label."""
    client, app, studies = server
    monkeypatch.setattr(app.datastore(), "_auto_reload", True)  # as served: the watcher, not the delete, refreshes
    monkeypatch.setattr(app.datastore(), "_reconcile_datastore", lambda: None)  # a watcher that has not run yet
    image = png_bytes(np.full((16, 16), 90, np.uint8))
    assert client.put("/datastore/image?image=gone_soon", data={"params": "{}"},
                      files={"file": ("x.png", image, "image/png")}).status_code == 200
    assert client.delete("/datastore/image?id=gone_soon").status_code == 200
    assert "gone_soon" not in app.datastore().list_images()  # at once, not when the watcher notices
    r = put_label(client, "gone_soon", np.ones((16, 16), np.uint8))
    assert r.status_code == 404, r.text
    assert not list((studies / "labels" / "final").glob("gone_soon.*"))


def test_an_image_id_too_long_for_a_file_name_is_refused(server):
    client, _, _ = server
    r = client.put(f"/datastore/image?image={'d' * 201}", data={"params": "{}"},
                   files={"file": ("x.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("request_", [
    ("put", f"/datastore/image/info?image={IDS[1]}", {"data": {"info": '{"n": "\\ud800"}'}}),
    ("put", f"/datastore/label?image={IDS[1]}&tag=t2", {"data": {"params": '{"x": "\\udfff"}'}}),
    ("post", "/activelearning/first", {"content": b'{"label_name": "\\ud800"}',
                                       "headers": {"content-type": "application/json"}}),
    ("post", f"/infer/multiverseg?image={IDS[1]}", {"data": {"params": '{"label_name": "\\ud800"}'}}),
])
def test_a_lone_surrogate_is_refused_and_the_index_stays_readable(server, request_):
    """JSON's \\ud800 escape is no text: stored in the index it left a datastore that no longer started, and
    quoted in an error message it made the answer a 500."""
    client, _, studies = server
    method, url, kwargs = request_
    if "label" in url and method == "put" and "info" not in url:
        kwargs = {**kwargs, "files": {"label": ("l.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")}}
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == 422 and "surrogate" in r.json()["detail"], r.text
    json.loads((studies / "datastore_v2.json").read_text(encoding="utf-8"))
    assert client.get(f"/datastore/image/info?image={IDS[1]}").status_code == 200


@pytest.mark.parametrize("params", [{"labels": 5}, {"labels": True}, {"labels": [1]}, {"label_name": 5}])
def test_label_names_of_the_wrong_type_are_refused(server, params):
    client, _, _ = server
    r = client.post(f"/infer/multiverseg_auto?image={IDS[1]}", data={"params": json.dumps(params)})
    assert r.status_code == 422 and "label" in r.json()["detail"], r.text
    r = client.post("/batch/infer/multiverseg_auto?run_sync=true", json={"images": [IDS[1]], **params})
    assert r.status_code == 422, r.text


def test_the_body_does_not_name_another_model_than_the_url(server):
    client, _, _ = server
    r = client.post(f"/infer/multiverseg?image={IDS[1]}&output=json",
                    data={"params": json.dumps({"model": "multiverseg_auto"})})
    assert r.status_code == 422 and "name one" in r.json()["detail"], r.text
    r = client.post(f"/infer/wsi/multiverseg?image={IDS[1]}&output=json",
                    json={"params": {"model": "multiverseg_auto", "foreground": [[5, 5]]}})
    assert r.status_code == 422 and "name one" in r.json()["detail"], r.text


def multipart(field: str, name: bytes, content: bytes) -> tuple[bytes, dict]:
    """A form of one file, its name as raw bytes (HTTP clients escape what no file name holds; not all do)."""
    body = (b"--b0\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{}\r\n--b0\r\nContent-Disposition: "
            b"form-data; name=\"" + field.encode() + b"\"; filename=\"" + name + b"\"\r\nContent-Type: image/png\r\n\r\n"
            + content + b"\r\n--b0--\r\n")
    return body, {"content-type": "multipart/form-data; boundary=b0"}


@pytest.mark.parametrize("name", [b"a.\x00png", b"a." + b"x" * 300])
def test_an_upload_named_what_no_file_can_be_named_is_refused(server, name):
    """MONAI Label names its temp copy after the upload: a NUL or a 300-character suffix made that a 500."""
    client, _, studies = server
    before = final_bytes(studies)
    png = png_bytes(np.zeros((8, 8), np.uint8))
    for method, url, field in [("put", f"/datastore/label?image={IDS[0]}&tag=final", "label"),
                               ("post", "/infer/multiverseg?output=json", "file"),
                               ("put", "/datastore/image?image=named_oddly", "file")]:
        body, headers = multipart(field, name, png)
        r = getattr(client, method)(url, content=body, headers=headers)
        assert r.status_code == 422 and "file name" in r.json()["detail"], (url, r.text)
    assert final_bytes(studies) == before


def test_scribble_values_are_plain_numbers(server):
    client, _, _ = server
    r = infer(client, IDS[1], {"scribbles_fg_label": "\u00b2"})
    assert r.status_code == 422 and "scribbles_fg_label" in r.json()["detail"], r.text


@pytest.mark.parametrize("value", ["yes", "on", "Y", "t"])
def test_session_archives_are_refused_however_true_is_spelt(server, value):
    client, _, _ = server
    before = server_temp_files()
    r = client.put(f"/session/?uncompress={value}", files={"files": ("x.png", png_bytes(np.zeros((8, 8), np.uint8)))})
    assert r.status_code == 422 and "uncompress" in r.json()["detail"], r.text
    assert server_temp_files() - before == set()


def test_an_encoded_nul_in_an_ohif_path_is_not_found(server):
    client, _, _ = server
    assert client.get("/ohif/a%00b.js").status_code == 404


def test_a_validation_error_quotes_a_short_piece_of_the_input(server):
    """FastAPI's own 422 quoted the whole field: a megabyte of text sent where a file belongs."""
    client, _, _ = server
    r = client.put("/datastore/image?image=texty", data={"params": "{}", "file": "x" * 1_000_000})
    assert r.status_code == 422 and len(r.content) < 2400, len(r.content)


def test_the_info_of_a_label_the_image_does_not_have_is_not_found(server):
    client, _, _ = server
    assert client.get(f"/datastore/label/info?label={IDS[0]}&tag=final").status_code == 200
    r = client.get(f"/datastore/label/info?label={IDS[0]}&tag=nope")
    assert r.status_code == 404 and "no 'nope' label" in r.json()["detail"], r.text


def test_ohif_scribbles_are_checked_against_the_volume_and_leave_no_files(tmp_path):
    """OHIF's .bin scribble labelmap: on a 2D image and in the wrong size it answered 500; every request
    left the upload, and each accepted one its converted NIfTI, in the temp folder."""
    studies = make_studies(tmp_path / "studies", IDS[:1], volume_ids=IDS[:3])
    with app_client(studies, {"labels": "head"}) as (client, _):
        volume = np.load(studies.parent / "volume_label.npy")
        scribbles = np.zeros(volume.shape, np.uint8)
        scribbles[volume.shape[0] // 2, volume.shape[1] // 2, 1] = 3  # one foreground voxel on slice 1
        params = json.dumps({"slice": 1})
        before = server_temp_files()
        r = client.post("/infer/multiverseg?image=vol_nifti&output=json", data={"params": params},
                        files={"label": ("label.bin", scribbles.tobytes(order="F"))})
        assert r.status_code == 200, r.text
        for image, body, word in [("vol_nifti", b"\x01" * 10, "bytes"), (IDS[0], b"\x01" * 10, "volumes"),
                                  ("", scribbles.tobytes(order="F"), "?image=")]:
            files = {"label": ("label.bin", body)}
            if not image:
                files["file"] = ("x.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")
            r = client.post(f"/infer/multiverseg?image={image}&output=json", data={"params": params}, files=files)
            assert r.status_code == 422 and word in r.json()["detail"], r.text
        assert server_temp_files() - before == set()


def test_a_datastore_whose_index_holds_a_lone_surrogate_starts(tmp_path):
    """Earlier versions stored info edits with a lone surrogate escape; the server then refused to start on
    that folder ('Invalid JSON: unexpected end of hex escape'). The escape is read as U+FFFD."""
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
    from monailabel.config import settings

    from mvlabel.localstore import CheckedDatastore

    studies = make_studies(tmp_path / "studies", IDS[:2])
    store = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
    store.update_image_info(IDS[0], {"note": "x"})
    index = studies / "datastore_v2.json"
    index.write_text(index.read_text().replace('"note":"x"', '"note":"a\\ud800b"').replace('"note": "x"',
                                                                                          '"note": "a\\ud800b"'))
    assert "\\ud800" in index.read_text()
    again = CheckedDatastore(str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
    assert again.get_image_info(IDS[0])["note"] == "a\ufffdb" and sorted(again.list_images()) == sorted(IDS[:2])


@pytest.mark.parametrize("method, url, status", [
    ("get", f"/datastore/label/info?label={IDS[0]}&tag=final&tag=nosuch", 400),  # FastAPI read the last one
    ("get", f"/datastore/image/info?image={IDS[0]}&image=nosuch", 400),
    ("post", f"/infer/multiverseg?image={IDS[0]}&image=&output=json", 400),  # it was a 500
    ("get", "/datastore/label/info?label=&tag=final", 422),  # a blank value was dropped, and {} answered
])
def test_a_query_parameter_is_given_once(server, method, url, status):
    """The guard read a parameter's first value and dropped blank ones; FastAPI reads the last."""
    client, _, _ = server
    r = getattr(client, method)(url, **({"data": {"params": "{}"}} if method == "post" else {}))
    assert r.status_code == status, r.text


def test_an_upload_named_with_its_whole_local_path_is_taken(server):
    """MONAI Label's own client (which Slicer's plugin copies) sends the local path as the file name."""
    client, _, _ = server
    body, headers = multipart("file", b"/home/someone/" + b"d" * 230 + b"/scan.png", png_bytes(np.zeros((8, 8), np.uint8)))
    r = client.put("/datastore/image?image=sent_with_path", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert client.delete("/datastore/image?id=sent_with_path").status_code == 200


def test_a_body_naming_no_model_is_not_a_model_named_null(server):
    client, _, _ = server
    r = client.post(f"/infer/multiverseg?image={IDS[1]}&output=json", data={"params": json.dumps({"model": None})})
    assert r.status_code == 422 and "name one" in r.json()["detail"], r.text


def test_an_unreadable_label_is_named_as_the_upload_not_by_the_servers_temporary_copy(server):
    client, _, studies = server
    before = final_bytes(studies)
    r = client.put(f"/datastore/label?image={IDS[0]}&tag=final", data={"params": "{}"},
                   files={"label": ("mine.png", b"\x89PNG\r\n\x1a\n broken", "image/png")})
    assert r.status_code in (415, 422) and "the uploaded label" in r.json()["detail"], r.text
    assert "tmp" not in r.json()["detail"] and final_bytes(studies) == before
    r = infer(client, IDS[0], {}, files={"label": ("mine.png", b"\x89PNG\r\n\x1a\n broken", "image/png")})
    assert r.status_code in (415, 422) and "the scribble label" in r.json()["detail"], r.text
    assert "tmp" not in r.json()["detail"]


def test_an_asap_label_is_filled_by_scanlines_and_a_polygon_no_label_can_be_is_refused(tmp_path):
    """One polygon of random vertices far outside the image froze the server for minutes: every pixel was
    tested against every vertex. A real outline of many vertices is still filled exactly."""
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
    from mvlabel.errors import BadRequest
    from mvlabel.imageio import read_asap, write_asap
    from mvlabel.wsi import polygons

    rng = np.random.default_rng(0)
    wild = rng.uniform(-1e9, 1e9, (20000, 2))
    pts = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(wild))
    path = tmp_path / "wild.xml"
    path.write_text(f'<ASAP_Annotations><Annotations><Annotation Name="a" PartOfGroup="head"><Coordinates>{pts}'
                    "</Coordinates></Annotation></Annotations></ASAP_Annotations>")
    with pytest.raises(BadRequest, match="cross the rows") as refused:
        read_asap(str(path), (64, 64), default_name="head")
    assert refused.value.status == 422
    yy, xx = np.mgrid[:300, :400]
    ring = (np.hypot(yy - 150, xx - 200) < 120) & ~(np.hypot(yy - 150, xx - 230) < 30)
    blobs = ring | (np.hypot(yy - 20, xx - 20) < 6)
    path = write_asap({"head": polygons(blobs, (0, 0), 0)}, {"head": "#00FF00"}, str(tmp_path / "blobs.xml"))
    np.testing.assert_array_equal(read_asap(path, blobs.shape, default_name="head")["head"], blobs)
