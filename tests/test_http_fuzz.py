"""Schemathesis over /openapi.json against a live server: valid and invalid requests to every
route (admin included, with the token) must never produce a 5xx, and answers must match the
schema. Bounded example counts keep it to seconds on the tiny model.

Operations are driven with plain Hypothesis (`operation.as_strategy()`): schemathesis' pytest
plugin does not run under this pytest version."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from http_harness import ADMIN_TOKEN, live_server

EXAMPLES_PER_OPERATION = 15


@pytest.fixture(scope="module")
def fuzz_server(tiny_loaded, tmp_path_factory):
    # A short context keeps generated requests short (most random max_new_tokens are a 4xx).
    with live_server(tiny_loaded, tmp_path_factory.mktemp("store"), max_queue=8, max_seq_len=64) as s:
        s.upload("alpha", seed=1)
        yield s


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_server, mode):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12

    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fuzz_server.url, headers=headers, timeout=60)
            checks = [not_a_server_error] + ([response_schema_conformance] if response.status_code < 300 else [])
            case.validate_response(response, checks=checks)

        try:
            check()
        except Unsatisfiable:    # no invalid input exists (e.g. GET /health in negative mode)
            pass
        except Exception as e:   # collect every operation's failure, not just the first
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)
