"""The admin listener's (aiohttp) side of the error tree: JSON answers and errors as
``web.Response``, built once here from what :mod:`sidecar.errors` renders."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from sidecar.errors import JSON_FIELDS, SidecarError, json_body


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    fields = CIMultiDict(JSON_FIELDS)
    if headers:
        fields.update(headers)
    return web.Response(status=status, body=json_body(body), headers=fields)


def error_response(exc: SidecarError) -> web.Response:
    status, fields, body = exc.render()
    resp = web.Response(status=status, body=body, headers=CIMultiDict(fields))
    if exc.close:
        resp.force_close()
    return resp
