"""Per-role tool patterns: the union over a key's roles, fnmatch syntax, case-sensitive; and the
filtering of tools/list results (JSON, batches, cacheScope)."""

from __future__ import annotations

import json

import pytest

from sidecar.gate.tools import ToolPolicy, Unfilterable, policy_for
from sidecar.settings import SettingsError, settings_from_mapping


def test_patterns_match_whole_names_case_sensitively() -> None:
    policy = ToolPolicy(("get_*", "search_plans", "item_[ab]"))
    assert [name for name in ("get_plan", "get_", "GET_plan", "search_plans", "search_plans2", "item_a",
                              "item_c", "xget_plan") if policy.allows(name)] == [
        "get_plan", "get_", "search_plans", "item_a"]


def test_no_patterns_allow_no_tool() -> None:
    assert not ToolPolicy(()).allows("anything")


def test_a_keys_patterns_are_the_union_of_its_roles() -> None:
    settings = settings_from_mapping({"roles": {
        "reader": {"permissions": ["plans:read"], "tools": ["get_*"]},
        "searcher": {"tools": ["search_*"]},
        "open": {"permissions": ["x"]},
    }}, {})
    assert settings.tool_patterns_for(("reader", "searcher")) == ("get_*", "search_*")
    # A role without tools allows every tool, whatever the key's other roles say.
    assert settings.tool_patterns_for(("reader", "open")) is None
    # A role removed from the config grants nothing, tools included.
    assert settings.tool_patterns_for(("gone",)) == ()
    assert settings.tool_patterns_for(("gone", "reader")) == ("get_*",)


def test_without_any_role_restricting_tools_nothing_is_restricted() -> None:
    settings = settings_from_mapping({"roles": {"a": {"permissions": ["x"]}}}, {})
    assert settings.tool_patterns_for(("a",)) is None
    assert settings.tool_patterns_for(("gone",)) is None


@pytest.mark.parametrize(("tools", "key"), [
    (["ok", "has space"], "roles.r.tools[1]"),
    ([""], "roles.r.tools[0]"),
    (["x" * 129], "roles.r.tools[0]"),
    ([3], "roles.r.tools[0]"),
    ("get_*", "roles.r.tools"),
])
def test_a_bad_pattern_stops_start_up_naming_it(tools: object, key: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from_mapping({"roles": {"r": {"permissions": ["x"], "tools": tools}}}, {})
    assert caught.value.key == key


def _list(tools: list[object], **extra: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": 1, "result": {"tools": tools, **extra}}


def test_a_tools_list_result_keeps_only_allowed_tools_and_its_cursor() -> None:
    policy = policy_for(("whoami",))
    body = json.dumps(_list([{"name": "add"}, {"name": "whoami", "inputSchema": {}}, {"name": 5}, "x"],
                            nextCursor="c2")).encode()
    assert json.loads(policy.filter_json(body)) == _list([{"name": "whoami", "inputSchema": {}}], nextCursor="c2")


def test_a_public_cache_scope_becomes_private_once_filtered() -> None:
    body = json.dumps(_list([{"name": "whoami"}], cacheScope="public", ttlMs=60000)).encode()
    result = json.loads(policy_for(("*",)).filter_json(body))["result"]
    assert result["cacheScope"] == "private"
    assert result["ttlMs"] == 60000


def test_other_answers_pass_byte_for_byte() -> None:
    policy = policy_for(("whoami",))
    for body in (b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"tools"}]}}',
                 b'{"jsonrpc": "2.0", "id": 1, "result": {"tools": "not a list"}}', b"not json at all", b"{}",
                 b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"\\u00e9"}]}}'):
        assert policy.filter_json(body) is body


@pytest.mark.parametrize("body", [
    b'{"jsonrpc":"2.0","id":1,"result":{"\\u0074ools":[{"name":"add"},{"name":"whoami"}]}}',
    b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"add"},{"name":"whoami"}]}}',
])
def test_a_tool_list_spelled_unusually_is_still_filtered(body: bytes) -> None:
    assert json.loads(policy_for(("whoami",)).filter_json(body))["result"]["tools"] == [{"name": "whoami"}]


@pytest.mark.parametrize("body", [
    b'not json but "tools"',
    b'{"result":{"tools":[{"name":"add","n":' + b"9" * 5000 + b"}]}}",  # past Python's int digits
    b'{"result":{"tools":[{"name":"add"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
    b'{"result":{"tools":[{"name":"whoami","x":1e999}]}}',  # would be written back as Infinity
])
def test_an_answer_that_may_hold_a_tool_list_but_cannot_be_read_is_unfilterable(body: bytes) -> None:
    with pytest.raises(Unfilterable):
        policy_for(("whoami",)).filter_json(body)


def test_a_batch_of_answers_is_filtered_element_by_element() -> None:
    body = json.dumps([_list([{"name": "add"}, {"name": "whoami"}]), {"jsonrpc": "2.0", "id": 2, "result": {}}])
    assert json.loads(policy_for(("whoami",)).filter_json(body.encode())) == [
        _list([{"name": "whoami"}]), {"jsonrpc": "2.0", "id": 2, "result": {}}]
