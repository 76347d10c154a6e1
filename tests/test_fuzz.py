"""Fuzzing every route of the server's OpenAPI schema (schemathesis), MONAI Label's own included: no answer
is a 5xx, none hangs, and no saved ``final`` label changes. Bounded: a few examples per route, no shrinking.

Authentication is off, so every caller has every role: the worst case. Routes whose purpose is to destroy
or to start server-wide work (deletes, reload, training, scoring, batch jobs, model upload) are left out:
an admin doing them is not a malformed request."""

from __future__ import annotations

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from .app_helpers import app_client, hc18_ids, hc18_pair, make_studies, png_bytes

pytestmark = pytest.mark.slow

IDS = hc18_ids(3, start=40)
EXAMPLES = 25  # per route
LEFT_OUT = ("/reload", "/train", "/scoring", "/batch", "/model", "/logs")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    studies = make_studies(root / "studies", IDS)
    with app_client(studies, {"labels": "head"}) as (client, app):
        r = client.put(f"/datastore/label?image={IDS[0]}&tag=final", data={"params": "{}"},
                       files={"label": ("l.png", png_bytes(hc18_pair(IDS[0])[1].astype(np.uint8)), "image/png")})
        assert r.status_code == 200, r.text
        final = studies / "labels" / "final" / f"{IDS[0]}.png"
        before = final.read_bytes()
        yield client
        assert final.read_bytes() == before, "a fuzzed request changed a saved final label"


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    from monailabel.app import app

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return schema.exclude(path_regex="^(" + "|".join(LEFT_OUT) + ")").exclude(method="DELETE")


def test_no_route_answers_a_5xx(api_schema):
    calls, failures = {}, []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(timeout=60)
            calls[operation.label] = calls.get(operation.label, 0) + 1
            if response.status_code >= 500:
                failures.append((case.method, case.formatted_path, case.query, response.text[:300]))

        fuzz()
    print(f"fuzzed {sum(calls.values())} requests over {len(calls)} routes: {len(failures)} 5xx")
    assert len(calls) >= 15 and not failures, failures[:5]
