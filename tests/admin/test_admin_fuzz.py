"""Schema-driven fuzzing of the admin API: every malformed input is refused with a 4xx JSON
``{"error", "message", ...}``, never a 500.

* schemathesis generates requests for every operation of the OpenAPI document the sidecar serves
  at ``/admin/api/openapi.json``: bodies and parameters that match the schema, ones that break
  it, boundary values, odd media types. Dictionaries steer some values to where the handlers
  go deepest: configured role names, a real key id, date-times at the edges of the range.
* Plain hypothesis tests add what a schema cannot describe: raw bodies of arbitrary JSON (nested
  thousands deep too, or with lone surrogates), query integers in any script's digits, login keys
  of any text, any Origin header, expiry times across the whole range and past it, any path id.

One real sidecar serves the module (both listeners on loopback, a real SQLite file) from its own
event loop in a thread, so the synchronous clients (schemathesis uses ``requests``) can talk to it
from the test's thread. Generation is derandomized with a fixed seed: every run sends the same
requests, so a failure here is a regression, not bad luck.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from admin.openapi import openapi_document
from admin.session import COOKIE_NAME
from tests.support.admin import AdminSidecar, admin_sidecar
from tests.support.harness import served_in_thread

# Fuzzed logins must not use up the failure budgets: a 429 is a fine answer, but a run that
# meets nothing but 429s would stop exercising the handlers behind them.
OPEN_BUDGETS = {"failures_per_minute_per_address": 1_000_000, "failures_per_minute_per_lookup_id": 1_000_000}
SEED = 20_240_531
# Stands for a real key's id in generated paths, replaced just before the call: rotate parses
# disable_old_at only for a key that exists.
TARGET_PLACEHOLDER = "key_FuzzTargetPlace"
ROLE_NAMES = ["viewer", "writer", "org-admin"]
# Date-times at and past the edges of what datetime holds (the first ones leave years 1-9999 only
# once converted to UTC), in other scripts' digits, not real (second 60, February 30, hour 24,
# offset 24:00), without a zone, in the past.
OUT_OF_RANGE_TIMES = [
    "9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59-00:01", "9999-12-31T23:00:00.5-01:00",
    "0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00+00:01", "0001-01-01T23:59:59.999999+23:59",
]
EDGE_TIMES = [
    *OUT_OF_RANGE_TIMES,
    "0001-01-01T00:00:00Z", "0001-01-01T00:00:00-23:59", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59+23:59",
    "9999-12-31T23:59:59.999999999Z", "+10000-01-01T00:00:00Z", "10000-01-01T00:00:00Z",
    "2999-01-01T00:00:00." + "9" * 2000 + "Z", "2999-12-31T23:59:60Z", "2999-02-30T00:00:00Z",
    "2999-01-01T24:00:00Z", "2999-01-01T00:00:00+24:00", "2999-01-01T00:00:00-00:00",
    "2999-01-01T00:00:00", "2999-01-01t00:00:00z", "2999-01-01 00:00:00Z", "1970-01-01T00:00:00Z",
    "\u0662\u0669\u0669\u0669-01-01T00:00:00Z", "\uff12\uff19\uff19\uff19-01-01T00:00:00Z", "\u00b2999-01-01T00:00:00Z",
]


@dataclass(frozen=True)
class LiveAdmin:
    origin: str
    key: str
    target_id: str
    sidecar: AdminSidecar
    # Loopback only: no proxy from the environment, kept-alive connections across examples.
    http: requests.Session

    @property
    def api(self) -> str:
        return self.origin + "/admin/api"

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")
def live_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAdmin]:
    """One sidecar for the module, served from a thread with its own event loop."""
    path = tmp_path_factory.mktemp("fuzz")

    async def setup(stack: AsyncExitStack) -> tuple[AdminSidecar, str]:
        sc = await stack.enter_async_context(admin_sidecar(path, auth=OPEN_BUDGETS))
        target, _ = await sc.services.keys.create(name="fuzz-target", roles=["viewer"], actor="cli", client=None)
        return sc, target.id

    with served_in_thread(setup, name="fuzzed-sidecar") as (sc, target_id):
        http = requests.Session()
        http.trust_env = False
        try:
            yield LiveAdmin(origin=sc.admin_origin, key=sc.admin_key, target_id=target_id, sidecar=sc, http=http)
        finally:
            http.close()
    # The admin middleware logs every 500 it turns into JSON: none may have happened.
    errors = [line for line in sc.log_lines() if line.get("level") == "error"]
    assert not errors, errors[:5]


def errors_are_json(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                    case: schemathesis.Case[Any]) -> bool | None:
    """Every 4xx of the admin API is ``{"error": code, "message": text, ...}`` in JSON."""
    if 400 <= response.status_code < 500:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/json"), f"{response.status_code} as {content_type!r}"
        assert_error_body(json.loads(response.content))
    return None


def assert_error_body(body: Any, field: str | None = None) -> None:
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    if field is not None:
        assert body.get("field") == field, body


# ---- schemathesis over the served OpenAPI document ----------------------------------------------


def _schema() -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": 100, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "dictionaries": {
            "roles": {"values": ROLE_NAMES},
            "times": {"values": EDGE_TIMES},
            "ids": {"values": [TARGET_PLACEHOLDER]},
        },
        "parameters": {
            "body.roles[*]": {"dictionary": "roles", "probability": 0.9},
            "body.expires_at": {"dictionary": "times", "probability": 0.5},
            "body.disable_old_at": {"dictionary": "times", "probability": 0.5},
            "path.id": {"dictionary": "ids", "probability": 0.5},
        },
    })
    # The same function serves /admin/api/openapi.json (checked against the live document below).
    # Built at import because schemathesis's lazy from_fixture() loader fails on pytest 9.
    return schemathesis.openapi.from_dict(openapi_document(COOKIE_NAME), config=config)


schema = _schema()
# parametrize() is typed as a bare Callable; say what it does to the test function.
for_every_operation: Callable[[Callable[..., None]], Callable[..., None]] = schema.parametrize()


def test_the_fuzzed_document_is_the_served_one(live_admin: LiveAdmin) -> None:
    served = live_admin.http.get(live_admin.api + "/openapi.json", headers=live_admin.bearer, timeout=10)
    assert served.status_code == 200
    assert served.json() == openapi_document(COOKIE_NAME)


@for_every_operation
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_generated_requests_without_5xx(case: schemathesis.Case[Any],
                                                                live_admin: LiveAdmin) -> None:
    if case.path_parameters and case.path_parameters.get("id") == TARGET_PLACEHOLDER:
        case.path_parameters["id"] = live_admin.target_id
    case.call_and_validate(base_url=live_admin.origin, session=live_admin.http, headers=live_admin.bearer,
                           checks=[not_a_server_error, errors_are_json])


# ---- what the document cannot describe -------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
key_fields = st.sampled_from(["name", "roles", "expires_at", "disable_old_at", "key"])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Request bodies: arbitrary JSON, objects with this API's member names, strings holding lone
    surrogates (what JSON "\\ud800" escapes decode to), deep nesting, junk."""
    kind = draw(st.sampled_from(["json", "object", "surrogates", "deep", "bytes"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "object":
        members = draw(st.dictionaries(key_fields, json_values | st.sampled_from(EDGE_TIMES), max_size=4))
        return json.dumps(members).encode()
    if kind == "surrogates":
        text = draw(st.text(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=50))
        return json.dumps({draw(key_fields): text, **draw(st.sampled_from([{}, {"roles": ["viewer"]}]))}).encode()
    if kind == "deep":
        depth = draw(st.integers(500, 20_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"name":[', "]}")]))
        return (opener * depth + "1" + closer * depth).encode()
    return draw(st.binary(max_size=200))


JSON_TYPE = {"Content-Type": "application/json"}
BODY_PATHS = ["/keys", "/keys/{target}/rotate", "/keys/{target}/disable", "/keys/{target}/enable",
              "/keys/key_unknown/rotate", "/session"]


@FUZZ
@given(path=st.sampled_from(BODY_PATHS), body=bodies())
def test_any_body_gets_an_answer_below_500(live_admin: LiveAdmin, path: str, body: bytes) -> None:
    # Login is unauthenticated: the body parser must hold before any key is checked.
    headers = {**JSON_TYPE, **({} if path == "/session" else live_admin.bearer)}
    resp = live_admin.http.post(live_admin.api + path.format(target=live_admin.target_id), data=body,
                                headers=headers, timeout=10)
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code >= 400:
        assert resp.headers["Content-Type"].startswith("application/json")
        assert_error_body(resp.json())


# Digits of every script (superscript two, Arabic-Indic, fullwidth): str.isdigit() and int() take
# them, the API must not.
any_digits = st.characters(categories=["Nd", "No"])
query_values = (st.text(min_size=1, max_size=24) | st.text(any_digits, min_size=1, max_size=4)
                | st.text(st.sampled_from("0123456789") | any_digits, min_size=1, max_size=20))


@FUZZ
@given(name=st.sampled_from(["limit", "before"]), value=query_values)
def test_any_query_integer_is_ascii_digits_or_a_400_naming_it(live_admin: LiveAdmin, name: str,
                                                             value: str) -> None:
    resp = live_admin.http.get(f"{live_admin.api}/audit?{name}={quote(value, safe='')}",
                               headers=live_admin.bearer, timeout=10)
    ascii_whole = value.isascii() and value.isdigit() and len(value) <= 18
    in_range = ascii_whole and 1 <= int(value) <= (500 if name == "limit" else 10**18)
    if in_range:
        assert resp.status_code == 200, (value, resp.text)
    else:
        assert resp.status_code == 400, (value, resp.status_code, resp.text)
        assert_error_body(resp.json(), field=name)
        assert resp.json()["error"] == "invalid_parameter"


AUDIT_FILTERS = {"action": re.compile(r"[a-z._]{1,64}"), "key_id": re.compile(r"[A-Za-z0-9_-]{1,128}")}


@FUZZ
@given(name=st.sampled_from(sorted(AUDIT_FILTERS)),
       value=st.text(min_size=1, max_size=140) | st.from_regex(r"[a-z._]{1,70}|[A-Za-z0-9_-]{120,135}", fullmatch=True))
def test_any_audit_filter_is_well_formed_or_a_400_naming_it(live_admin: LiveAdmin, name: str, value: str) -> None:
    resp = live_admin.http.get(f"{live_admin.api}/audit?{name}={quote(value, safe='')}",
                               headers=live_admin.bearer, timeout=10)
    if AUDIT_FILTERS[name].fullmatch(value):
        assert resp.status_code == 200, (value, resp.text)
    else:
        assert resp.status_code == 400, (value, resp.status_code, resp.text)
        assert_error_body(resp.json(), field=name)
        assert resp.json()["error"] == "invalid_parameter"


@FUZZ
@given(key=st.text(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=60)
       | st.builds("tak_{}".format, st.text(st.characters(categories=["Cs"]) | st.characters(), min_size=46,
                                            max_size=46)))
def test_any_login_key_string_is_a_failed_login(live_admin: LiveAdmin, key: str) -> None:
    # json.dumps writes lone surrogates as "\udXXX" escapes, as a hostile client would.
    resp = live_admin.http.post(live_admin.api + "/session", data=json.dumps({"key": key}), headers=JSON_TYPE,
                                timeout=10)
    assert resp.status_code in (401, 422), (key, resp.status_code, resp.text)
    assert_error_body(resp.json(), field="key")


# Header values as a client can send them (Latin-1, no line breaks, no surrounding blanks).
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                        max_size=40).map(str.strip)
origins = (header_values | st.builds("http{}://{}".format, st.sampled_from(["", "s"]), header_values)
           | st.sampled_from(["http://[::1", "http://]", "https://[zz]", "http://a]b", "null", "http://[::1]:99999"]))


@FUZZ
@given(origin=origins, site=st.none() | st.sampled_from(["same-origin", "none", "cross-site"]) | header_values)
def test_any_origin_on_login_is_an_answer_below_500(live_admin: LiveAdmin, origin: str, site: str | None) -> None:
    headers = {"Origin": origin, **({} if site is None else {"Sec-Fetch-Site": site})}
    resp = live_admin.http.post(live_admin.api + "/session", json={"key": live_admin.key}, headers=headers, timeout=10)
    assert resp.status_code in (200, 403), (origin, site, resp.status_code, resp.text)
    if resp.status_code == 403:
        assert_error_body(resp.json())
        assert resp.json()["error"] == "cross_site_request"


# Expiry: the named field or a key that expires when asked. Generated times cover years 1-9999
# with any offset of at most 23:59 and up to 12 fractional digits; sampled ones the edge cases.
offsets = st.sampled_from(["Z", "z"]) | st.builds("{}{:02d}:{:02d}".format, st.sampled_from("+-"),
                                                  st.integers(0, 23), st.integers(0, 59))


@st.composite
def rfc3339_times(draw: st.DrawFn) -> str:
    when = draw(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)))
    fraction = draw(st.text(st.sampled_from("0123456789"), max_size=12))
    return when.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0") + (f".{fraction}" if fraction else "") + draw(offsets)


times = st.sampled_from(EDGE_TIMES) | rfc3339_times() | st.sampled_from(OUT_OF_RANGE_TIMES)


@FUZZ
@given(when=times | json_scalars, rotate=st.booleans(), name=st.from_regex(r"[a-z]{12}", fullmatch=True))
def test_any_expiry_is_a_future_time_or_a_422_naming_it(live_admin: LiveAdmin, when: Any, rotate: bool,
                                                        name: str) -> None:
    field = "disable_old_at" if rotate else "expires_at"
    path = f"/keys/{live_admin.target_id}/rotate" if rotate else "/keys"
    body = {"name": name, field: when} if rotate else {"name": name, "roles": ["viewer"], field: when}
    resp = live_admin.http.post(live_admin.api + path, json=body, headers=live_admin.bearer, timeout=10)
    if resp.status_code == 409:  # the name was drawn before; the time was accepted
        return
    if resp.status_code in (200, 201):
        answered = resp.json()["disable_old_at" if rotate else "expires_at"]
        assert when is None or datetime.fromisoformat(answered.replace("Z", "+00:00")) > datetime.now(UTC), resp.text
        return
    assert resp.status_code == 422, (when, resp.status_code, resp.text)
    assert_error_body(resp.json(), field=field)
    assert resp.json()["error"] == "invalid_time"


@FUZZ
@given(key_id=st.text(min_size=1, max_size=80), verb=st.sampled_from(["", "/disable", "/enable", "/rotate"]))
def test_any_path_id_is_a_key_or_a_json_404(live_admin: LiveAdmin, key_id: str, verb: str) -> None:
    method = "GET" if verb == "" else "POST"
    body = json.dumps({"name": "never-made"} if verb == "/rotate" else {}).encode() if method == "POST" else None
    resp = live_admin.http.request(method, f"{live_admin.api}/keys/{quote(key_id, safe='')}{verb}", data=body,
                                   headers=live_admin.bearer, timeout=10)
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code >= 400:
        assert resp.headers["Content-Type"].startswith("application/json")
        assert_error_body(resp.json())


@FUZZ
@given(scheme=st.sampled_from(["Bearer ", "bearer ", "Bearer  ", "Basic ", ""]),
       token=header_values | st.builds("tak_{}".format, header_values))
def test_any_authorization_header_is_a_json_refusal(live_admin: LiveAdmin, scheme: str, token: str) -> None:
    resp = live_admin.http.get(live_admin.api + "/keys", headers={"Authorization": scheme + token}, timeout=10)
    assert resp.status_code in (400, 401), (scheme, token, resp.status_code, resp.text)
    assert resp.headers["Content-Type"].startswith("application/json")
    assert_error_body(resp.json())
