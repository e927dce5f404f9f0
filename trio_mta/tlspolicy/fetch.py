"""The MTA-STS policy fetch (RFC 8461 §3.3): one HTTPS GET, h11 over ``trio.SSLStream``.

Why h11 and not httpx: the fetch needs exactly one request with rules of its
own (no redirects, a small size cap, one overall deadline, the certificate
checked against ``[relay] ca_file`` or the system store, the host resolved
through ``[dns] nameservers``), and h11 is the sans-IO HTTP/1.1 machine this
project's SMTP core is modelled on: every byte goes through code we can read,
with no connection pool, proxy variables or redirect logic to switch off.

Everything that goes wrong is a :class:`FetchError` with one line of reason.
"""

from __future__ import annotations

import ssl
from typing import Final

import h11
import trio

from trio_mta import __version__
from trio_mta.dns import DnsError, Resolver
from trio_mta.tlspolicy.sts import policy_url_host

__all__ = ["MAX_POLICY_SIZE", "POLICY_PATH", "FetchError", "fetch_policy"]

POLICY_PATH: Final = "/.well-known/mta-sts.txt"
MAX_POLICY_SIZE: Final = 64 * 1024  # RFC 8461 §3.3 suggests senders limit the body (64 KiB)
_RECEIVE_SIZE: Final = 16384


class FetchError(Exception):
    """No policy could be fetched; str() is the reason, for the log and the CLI."""


async def fetch_policy(
    domain: str,
    *,
    resolver: Resolver,
    context: ssl.SSLContext,
    port: int = 443,
    timeout: float = 30.0,
    max_size: int = MAX_POLICY_SIZE,
) -> str:
    """The body of ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` as text.

    *context* must verify certificates and host names; *port* is 443 except in tests.
    """
    host = policy_url_host(domain)
    try:
        with trio.fail_after(timeout):
            return await _fetch(host, resolver, context, port, max_size)
    except trio.TooSlowError:
        raise FetchError(
            f"fetching https://{host}{POLICY_PATH} timed out after {timeout:g}s"
        ) from None


async def _fetch(
    host: str, resolver: Resolver, context: ssl.SSLContext, port: int, max_size: int
) -> str:
    try:
        addresses = await resolver.addresses(host)
    except DnsError as exc:
        raise FetchError(f"policy host {host}: {exc}") from None
    stream = await _connect(host, addresses, port)
    tls = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
    try:
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise FetchError(f"TLS with {host}: {_tls_reason(exc)}") from None
        return await _get(tls, host, max_size)
    finally:
        with trio.move_on_after(1):
            await tls.aclose()


async def _connect(host: str, addresses: tuple[str, ...], port: int) -> trio.SocketStream:
    problems: list[str] = []
    for address in addresses:
        try:
            return await trio.open_tcp_stream(address, port)
        except OSError as exc:
            problems.append(f"{address} port {port}: {exc.strerror or exc}")
    raise FetchError(f"cannot connect to {host}: " + "; ".join(problems))


async def _get(stream: trio.SSLStream[trio.SocketStream], host: str, max_size: int) -> str:
    conn = h11.Connection(our_role=h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=POLICY_PATH,
        headers=[
            ("Host", host),
            ("User-Agent", f"trio-mta/{__version__}"),
            ("Accept", "text/plain"),
            ("Connection", "close"),
        ],
    )
    try:
        await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(_RECEIVE_SIZE)))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                _check_response(event, host, max_size)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_size:
                    raise FetchError(f"policy from {host} is larger than {max_size} bytes")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    except h11.ProtocolError as exc:
        raise FetchError(f"bad HTTP response from {host}: {exc}") from None
    except (trio.BrokenResourceError, OSError) as exc:
        raise FetchError(f"connection to {host} broke: {_tls_reason(exc)}") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError(f"policy from {host} is not UTF-8 text") from None


def _check_response(response: h11.Response, host: str, max_size: int) -> None:
    status = response.status_code
    if 300 <= status < 400:
        # RFC 8461 §3.3: "HTTP 3xx redirects MUST NOT be followed".
        raise FetchError(
            f"{host} answered HTTP {status} (a redirect; RFC 8461 §3.3 forbids following it)"
        )
    if status != 200:
        raise FetchError(f"{host} answered HTTP {status}, not 200")
    for name, value in response.headers:
        if name == b"content-length" and value.isdigit() and int(value) > max_size:
            raise FetchError(f"policy from {host} is {int(value)} bytes, over {max_size}")


def _tls_reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    return str(cause or exc) or type(cause or exc).__name__
