"""Small pieces of HTTP/1.1 both engines and the admin listener share: the Date field, reason
phrases and the fixed JSON body of a refusal."""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from http import HTTPStatus

_date_second = 0
_date_value = ""


def http_date() -> str:
    """The Date field value (RFC 9110 6.6.1), formatted once per second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = formatdate(now, usegmt=True)
    return _date_value


def error_body(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    code = "invalid_request" if status == 400 else phrase.lower().replace(" ", "_").replace("-", "_")
    return json.dumps({"error": code, "error_description": phrase}).encode()


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
