"""Who is the client: the peer address, or the forwarded one when the peer is a trusted proxy."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Protocol

from multidict import MultiMapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientRequest(Protocol):
    """What authentication reads of a request; both the public listener's requests and aiohttp's
    (the admin page's login) have it."""

    @property
    def remote(self) -> str | None: ...

    @property
    def headers(self) -> MultiMapping[str]: ...

    @property
    def query_string(self) -> str: ...


def is_trusted(peer: str | None, trusted: Sequence[Network]) -> bool:
    if not trusted or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in trusted)


def client_address(request: ClientRequest, trusted: Sequence[Network]) -> str:
    """The client's address. Behind trusted proxies, walk X-Forwarded-For from the right and
    take the first hop that is not itself trusted (the left part is client-controlled)."""
    peer = request.remote or "unknown"
    if not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", []) for h in v.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        if not is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    return peer
