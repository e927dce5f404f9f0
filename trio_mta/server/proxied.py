"""A listener behind HAProxy (``proxy_protocol = true``): who the client really is.

Before the banner (and before the TLS handshake of smtps) the connection must
come from a peer in ``proxy_from`` and begin with a PROXY header, read within
``ServerState.proxy_header_timeout``; :mod:`trio_mta.proxy` parses it. The
address in the header then replaces the peer's for every purpose, because the
session only ever knows the address this module hands it. Anything else is
closed without a word, and logged with the reason.

A header that names no client IP (version 1 ``UNKNOWN``, version 2
``UNSPEC``/UNIX) is refused too: taking the proxy's own address instead would
hand its relay rights (loopback is trusted by default) to an unknown client.
A ``LOCAL`` header is the proxy's own health check and keeps the proxy's
address, as the protocol specifies.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import trio

from trio_mta import log
from trio_mta.config import ListenConfig
from trio_mta.proxy import NEED_DATA, ProxyHeader, ProxyHeaderError, ProxyHeaderReader

PROXY_HEADER_TIMEOUT = 5.0
_RECEIVE_SIZE = 4096


class PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read from it (sent behind the header)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport = stream
        self._prefix = prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return out
        return bytes(await self.transport.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.transport.aclose()


@dataclass(frozen=True)
class Proxied:
    """A connection whose PROXY header was accepted."""

    stream: trio.abc.Stream
    client_ip: str
    client_port: int
    header: ProxyHeader


def _unmapped(ip: str) -> str:
    """``::ffff:192.0.2.1`` is the IPv4 client 192.0.2.1 (as the listener treats peers)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def allowed_proxy(listen: ListenConfig, peer_ip: str) -> bool:
    address = ipaddress.ip_address(_unmapped(peer_ip))
    return any(address in network for network in listen.proxy_from)


async def read_header(stream: trio.abc.Stream, timeout: float) -> tuple[ProxyHeader, bytes]:
    """The header and the bytes behind it; raises ProxyHeaderError (timeout and EOF too)."""
    reader = ProxyHeaderReader()
    with trio.move_on_after(timeout):
        while True:
            event = reader.next_event()
            if event is not NEED_DATA:
                return event, reader.trailing_data
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise ProxyHeaderError("connection closed before a complete PROXY header")
            reader.receive_data(bytes(data))
    raise ProxyHeaderError(f"no complete PROXY header within {timeout:g}s")


async def accept_proxied(
    stream: trio.abc.Stream, listen: ListenConfig, peer_ip: str, peer_port: int, timeout: float
) -> Proxied | None:
    """The client behind the proxy, or None (logged) when the connection must be closed."""
    where = f"{listen.address} ({listen.mode})"
    if not allowed_proxy(listen, peer_ip):
        log.warning(
            "smtpd.proxy_refused", peer=peer_ip, listener=where, reason="peer not in proxy_from"
        )
        return None
    try:
        header, rest = await read_header(stream, timeout)
    except ProxyHeaderError as exc:
        log.warning("smtpd.proxy_refused", peer=peer_ip, listener=where, reason=str(exc))
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.warning(
            "smtpd.proxy_refused",
            peer=peer_ip,
            listener=where,
            reason=f"connection lost: {exc or type(exc).__name__}",
        )
        return None
    if header.command == "LOCAL":
        client_ip, client_port = _unmapped(peer_ip), peer_port
    elif header.client is None:
        log.warning(
            "smtpd.proxy_refused",
            peer=peer_ip,
            listener=where,
            reason=f"version {header.version} header names no client IP ({header.family})",
        )
        return None
    else:
        client_ip, client_port = _unmapped(header.client[0]), header.client[1]
    if rest:
        stream = PrefixedStream(stream, rest)
    return Proxied(stream, client_ip, client_port, header)
