"""Schemathesis over the whole /openapi.json of a live server on the tiny model: no input may cause a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from bot.http.app import create_app
from bot.services import open_services
from dialogue.settings import Settings
from test_api import LiveServer, wait_for

EXAMPLES = 20  # per operation and mode: about 700 requests in all, ~40 s here
OPERATOR = "fuzz-admin-key-0123456789"  # an admin key reaches every route, so every route is fuzzed past the auth


@pytest.fixture(scope="module")
def live_api(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz-home")
    configured = Settings(home=home, model=str(tiny_model_dir), dtype="float32", threads=1, max_new_tokens=8,
                          temperature=0.0, context_budget=512, api_keys=[], admin_keys=[OPERATOR], api_rate_per_minute=0,
                          api_user_rate_per_minute=0)
    services = open_services(configured)
    services.backend.worker.wait_ready(60)
    with LiveServer(create_app(services)) as live:
        wait_for(lambda: httpx.get(live.url + "/readyz").status_code == 200, timeout=90)
        yield live
    services.close()


@pytest.fixture(scope="module")
def operations(live_api):
    loaded = schemathesis.openapi.from_url(live_api.url + "/openapi.json")
    found = [result.ok() for result in loaded.get_all_operations()]
    assert len(found) >= 20  # every route of SPEC's list is in the schema
    return found


def fuzz(operation, mode: GenerationMode) -> None:
    """Up to EXAMPLES generated requests against one operation; any 5xx fails with the request shown."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])
        content_type = (response.headers.get("content-type") or [""])[0]
        if response.status_code >= 400 and content_type.startswith("application/json"):
            assert isinstance(response.json().get("error"), str), response.text[:200]

    try:
        run()
    except Unsatisfiable:  # no parameters to break (GET /healthz): nothing invalid can be sent
        assert mode == GenerationMode.NEGATIVE


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_input_causes_a_server_error(live_api, operations, mode):
    for operation in operations:
        fuzz(operation, mode)
    assert httpx.get(live_api.url + "/healthz").json() == {"ok": True}
