"""Authentication and roles on the real server: ``monailabel start_server`` with MONAI Label's auth settings
pointing at an OpenID provider on loopback (tests/oidc.py), and tokens per role, expired, forged, for
another client, and none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from bench.bench_server import free_port, start_server, stop

from .app_helpers import hc18_ids, hc18_pair, make_studies, png_bytes, save_tiny_weights
from .oidc import Provider

pytestmark = pytest.mark.slow

IDS = hc18_ids(3, start=30)
ROLES = {"user": "monailabel-user", "annotator": "monailabel-annotator", "reviewer": "monailabel-reviewer",
         "admin": "monailabel-admin"}
ORDER = list(ROLES)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    studies = make_studies(root / "studies", IDS)
    save_tiny_weights(root / "tiny.pt")
    with Provider() as provider:
        port = free_port()
        env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": provider.issuer,
               "MONAI_LABEL_AUTH_CLIENT_ID": "monailabel-app"}
        proc = start_server(studies, port, root / "server.log", {"weights": root / "tiny.pt", "labels": "head"},
                            env=env)
        try:
            yield f"http://127.0.0.1:{port}", provider
        finally:
            stop(proc)


def call(url: str, method: str, path: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ys, xs = np.nonzero(hc18_pair(IDS[0])[1])
    click = {"params": json.dumps({"foreground": [[int(xs.mean()), int(ys.mean())]], "client_id": "t"})}
    label = {"label": ("l.png", png_bytes(hc18_pair(IDS[1])[1].astype(np.uint8)), "image/png")}
    requests_by_route = {
        "GET /info/": lambda: requests.get(url + "/info/", headers=headers, timeout=30),
        "POST /infer": lambda: requests.post(f"{url}/infer/multiverseg?image={IDS[0]}&output=json", data=click,
                                             headers=headers, timeout=60),
        "POST /activelearning": lambda: requests.post(url + "/activelearning/first", json={}, headers=headers,
                                                      timeout=30),
        "PUT /datastore/label": lambda: requests.put(f"{url}/datastore/label?image={IDS[1]}&tag=final",
                                                     data={"params": "{}"}, files=label, headers=headers, timeout=60),
        "GET /datastore/label": lambda: requests.get(f"{url}/datastore/label?label={IDS[1]}&tag=final",
                                                     headers=headers, timeout=30),
        "PUT /datastore/image": lambda: requests.put(
            f"{url}/datastore/image?image=new_{abs(hash(token)) % 10**6}", data={"params": "{}"},
            files={"file": ("n.png", png_bytes(np.zeros((16, 16), np.uint8)), "image/png")}, headers=headers,
            timeout=30),
        "DELETE /datastore/image": lambda: requests.delete(url + "/datastore/image?id=no-such-image",
                                                           headers=headers, timeout=30),
        "POST /scoring": lambda: requests.post(url + "/scoring/", headers=headers, timeout=30),
        "POST /train": lambda: requests.post(url + "/train/", headers=headers, timeout=30),
        "POST /reload": lambda: requests.post(url + "/reload", headers=headers, timeout=30),
    }
    return requests_by_route[f"{method} {path}"]()


# (route, least role); admin-only routes that would change the server are tried below admin only
MATRIX = [
    ("GET /info/", "user"),
    ("POST /infer", "annotator"),
    ("POST /activelearning", "annotator"),
    ("PUT /datastore/label", "annotator"),
    ("GET /datastore/label", "reviewer"),
    ("PUT /datastore/image", "admin"),
    ("DELETE /datastore/image", "admin"),
    ("POST /scoring", "admin"),
    ("POST /train", "admin"),
    ("POST /reload", "admin"),
]
SKIP_ADMIN = {"POST /scoring", "POST /train", "POST /reload"}


@pytest.mark.parametrize("route, least", MATRIX)
def test_each_role_may_do_what_its_role_allows(site, route, least):
    url, provider = site
    method, path = route.split(" ", 1)
    for role in ORDER:
        if role == "admin" and route in SKIP_ADMIN:
            continue
        r = call(url, method, path, provider.token([ROLES[role]], user=role))
        allowed = ORDER.index(role) >= ORDER.index(least)
        if allowed:
            assert r.status_code not in (401, 403), (route, role, r.status_code, r.text)
        else:
            assert r.status_code == 403, (route, role, r.status_code, r.text)
    assert call(url, method, path, None).status_code == 401


@pytest.mark.parametrize("kind", ["expired", "forged", "other audience", "garbage", "unknown key", "no key id"])
def test_invalid_tokens_are_401(site, kind):
    url, provider = site
    token = {
        "expired": lambda: provider.token([ROLES["admin"]], lifetime=-60),
        "forged": lambda: provider.token([ROLES["admin"]], stranger=True),
        "other audience": lambda: provider.token([ROLES["admin"]], audience="another-app"),
        "garbage": lambda: "not.a.token",
        "unknown key": lambda: provider.token([ROLES["admin"]], stranger=True, kid="other-key"),
        "no key id": lambda: provider.token([ROLES["admin"]], stranger=True, kid=None),
    }[kind]()
    for route in ("GET /info/", "POST /infer", "POST /reload"):
        method, path = route.split(" ", 1)
        r = call(url, method, path, token)
        assert r.status_code == 401, (kind, route, r.status_code, r.text)
    # MONAI Label's own token check (its route, not the guard's): a key the provider does not have was a 500
    r = requests.get(url + "/auth/token/valid", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 401, (kind, r.status_code, r.text)


def test_a_login_the_provider_refuses_is_401(site):
    """MONAI Label passes the identity provider's refusal on as an exception: it was a 500."""
    url, _ = site
    r = requests.post(url + "/auth/token", data={"username": "alice", "password": "wrong"}, timeout=30)
    assert r.status_code == 401 and "identity provider" in r.json()["detail"], r.text


def test_the_viewer_needs_a_user_and_cors_is_closed(site):
    url, provider = site
    assert requests.get(url + "/ohif/", timeout=30).status_code == 401
    r = requests.get(url + "/ohif/", headers={"Authorization": f"Bearer {provider.token([ROLES['user']])}"},
                     timeout=30)
    assert r.status_code == 200
    r = requests.options(url + "/info/", headers={"Origin": "https://evil.example",
                                                  "Access-Control-Request-Method": "DELETE"}, timeout=30)
    assert r.headers.get("access-control-allow-origin") not in ("*", "https://evil.example")


def test_a_client_id_never_reaches_another_users_state_or_saved_record(site):
    """Slicer sends the same default client_id for everyone: the state of clicks is the user's own. A
    reviewer who edits a label's info is recorded as its editor, not as the one who saved it."""
    url, provider = site
    alice, bob = (provider.token([ROLES["annotator"]], user=u) for u in ("alice", "bob"))
    reviewer = provider.token([ROLES["reviewer"]], user="rita")
    ys, xs = np.nonzero(hc18_pair(IDS[2])[1])
    params = {"foreground": [[int(xs.mean()), int(ys.mean())]], "client_id": "user-xyz"}

    def click(token, **more):
        r = requests.post(f"{url}/infer/multiverseg?image={IDS[2]}&output=json",
                          data={"params": json.dumps({**params, **more})},
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["refined"]

    assert click(alice) is False
    assert click(alice, background=[[2, 2]]) is True  # her second click refines her first
    assert click(bob, background=[[2, 2]]) is False  # the same client_id, another user: a fresh start
    label = {"label": ("l.png", png_bytes(hc18_pair(IDS[2])[1].astype(np.uint8)), "image/png")}
    r = requests.put(f"{url}/datastore/label?image={IDS[2]}&tag=final", data={"params": "{}"}, files=label,
                     headers={"Authorization": f"Bearer {alice}"}, timeout=60)
    assert r.status_code == 200, r.text
    auth = {"Authorization": f"Bearer {reviewer}"}
    r = requests.put(f"{url}/datastore/label/info?label={IDS[2]}&tag=final",
                     data={"info": json.dumps({"comment": "checked"})}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    r = requests.put(f"{url}/datastore/updatelabelinfo?label={IDS[2]}&tag=final",
                     data={"params": json.dumps({"ts": 5, "user": "mallory"})}, headers=auth, timeout=30)
    assert r.status_code == 422, r.text
    info = requests.get(f"{url}/datastore/label/info?label={IDS[2]}&tag=final", headers=auth, timeout=30).json()
    assert info["user"] == "alice" and info["edited_by"] == "rita" and info["comment"] == "checked"
    # remote clients get no server file paths, nor the record of who else was offered an image
    for _ in range(2):
        r = requests.post(f"{url}/activelearning/random", json={"client_id": "user-xyz"},
                          headers={"Authorization": f"Bearer {bob}"}, timeout=30)
        assert r.status_code == 200 and r.json()["strategy"] == "random" and "path" not in r.json(), r.text
    r = requests.get(f"{url}/datastore/image/info?image={IDS[2]}", headers={"Authorization": f"Bearer {alice}"}, timeout=30)
    assert r.status_code == 200 and "path" not in r.json() and "strategy" not in r.json(), r.text


def test_a_session_is_its_owners_and_names_no_server_path(site):
    """A Slicer session (an uploaded image) is seen, used and deleted by the user who uploaded it only; its
    answers name the image file, not where the server keeps it."""
    url, provider = site
    alice, bob = (provider.token([ROLES["annotator"]], user=u) for u in ("alice", "bob"))
    image = png_bytes(hc18_pair(IDS[1])[0])
    r = requests.put(f"{url}/session/", files={"files": ("scan.png", image, "image/png")},
                     headers={"Authorization": f"Bearer {alice}"}, timeout=60)
    assert r.status_code == 200, r.text
    session = r.json()["session_id"]
    assert "path" not in r.json()["session_info"] and r.json()["session_info"]["image"] == "scan.png"
    as_bob = {"Authorization": f"Bearer {bob}"}
    assert requests.get(f"{url}/session/{session}", headers=as_bob, timeout=30).status_code == 404
    assert requests.get(f"{url}/session/{session}?image=true", headers=as_bob, timeout=30).status_code == 404
    r = requests.post(f"{url}/infer/multiverseg?session_id={session}&output=json", data={"params": "{}"},
                      headers=as_bob, timeout=60)
    assert r.status_code == 404, r.text
    assert requests.delete(f"{url}/session/{session}", headers=as_bob, timeout=30).status_code == 404
    as_alice = {"Authorization": f"Bearer {alice}"}
    r = requests.get(f"{url}/session/{session}", headers=as_alice, timeout=30)
    assert r.status_code == 200 and "/" not in json.dumps(r.json()["image"]), r.text
    r = requests.post(f"{url}/infer/multiverseg?session_id={session}&output=json", data={"params": "{}"},
                      headers=as_alice, timeout=60)
    assert r.status_code == 200, r.text
    assert requests.delete(f"{url}/session/{session}", headers=as_alice, timeout=30).status_code == 200


def test_what_an_annotator_sees_of_others_and_what_a_save_or_edit_may_claim(site):
    """The listing showed other users' next-sample leases (who was offered which image) and `output=train`
    the server's folders; a save could carry a reviewer's `edited_by` stamp, and an info edit a series'
    DICOM identity, which next-sample answers hand to OHIF."""
    url, provider = site
    alice, bob = (provider.token([ROLES["annotator"]], user=u) for u in ("alice", "bob"))
    as_alice, as_bob = ({"Authorization": f"Bearer {t}"} for t in (alice, bob))
    assert requests.post(url + "/activelearning/first", json={"client_id": "c1"}, headers=as_bob,
                         timeout=30).status_code == 200
    listing = requests.get(url + "/datastore/?output=all", headers=as_alice, timeout=30)
    assert listing.status_code == 200 and "bob" not in listing.text and '"strategy"' not in listing.text
    label = {"label": ("l.png", png_bytes(hc18_pair(IDS[0])[1].astype(np.uint8)), "image/png")}
    r = requests.put(f"{url}/datastore/label?image={IDS[0]}&tag=final", files=label, headers=as_alice,
                     data={"params": json.dumps({"edited_by": "rita"})}, timeout=60)
    assert r.status_code == 200, r.text
    reviewer = {"Authorization": f"Bearer {provider.token([ROLES['reviewer']], user='rita')}"}
    info = requests.get(f"{url}/datastore/label/info?label={IDS[0]}&tag=final", headers=reviewer, timeout=30).json()
    assert info.get("user") == "alice" and "edited_by" not in info, info
    train = requests.get(url + "/datastore/?output=train", headers=as_alice, timeout=30).json()
    assert train and all(not path.startswith("/") for row in train for path in row.values()), train
    r = requests.put(f"{url}/datastore/image/info?image={IDS[1]}", headers=as_alice, timeout=30,
                     data={"info": json.dumps({"SeriesInstanceUID": "1.2.3", "PatientID": "OTHER"})})
    assert r.status_code == 422 and "SeriesInstanceUID" in r.json()["detail"], r.text


def test_a_slow_identity_provider_holds_up_only_the_requests_that_wait_for_it(tmp_path):
    """Token checks ran on the event loop: while the provider's keys were fetched (slowly), every other
    request waited, public ones too."""
    import threading

    studies = make_studies(tmp_path / "studies", IDS[:1])
    save_tiny_weights(tmp_path / "tiny.pt")
    with Provider() as provider:
        provider.certs_gate = threading.Event()  # the keys, fetched at the first token checked, wait for it
        port = free_port()
        env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": provider.issuer,
               "MONAI_LABEL_AUTH_CLIENT_ID": "monailabel-app"}
        proc = start_server(studies, port, tmp_path / "server.log", {"weights": tmp_path / "tiny.pt"}, env=env)
        answers = []
        try:
            url = f"http://127.0.0.1:{port}"
            token = provider.token([ROLES["user"]])
            first = threading.Thread(target=lambda: answers.append(requests.get(
                url + "/info/", headers={"Authorization": f"Bearer {token}"}, timeout=90)))
            first.start()
            assert provider.certs_asked.wait(60)
            public = requests.get(url + "/auth/", timeout=20)  # while the keys are still on their way
            assert public.status_code == 200 and not provider.certs_gate.is_set()
        finally:
            provider.certs_gate.set()
            first.join(90)
            stop(proc)
    assert answers and answers[0].status_code == 200, answers
