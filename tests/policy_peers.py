"""Peers for the MTA-STS and DANE tests: a loopback HTTPS policy server (h11 over a
trustme certificate), an aiosmtpd handler that records MAIL commands, and TLSA
record text computed from real certificates.

The policy server listens on 127.0.0.1 with a free port: port 443 is not ours to
bind in tests, so the agent under test gets that port through the test-only
``[relay] mta_sts_port``; the host name mta-sts.DOMAIN resolves to 127.0.0.1 through
the loopback DNS server, and its certificate is checked against the test CA given
as ``[relay] ca_file``, exactly as production checks the real one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ssl
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.test_client import Recorder

POLICY_HOST = "mta-sts.remote.test"


def policy_text(mode: str = "enforce", *mx: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass
class PolicyServer:
    """Serves one body at /.well-known/mta-sts.txt; ``requests`` lists the targets asked for."""

    body: bytes = b""
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    stall: bool = False  # accept, then never answer (timeouts)
    requests: list[str] = field(default_factory=list)
    port: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        # A client that refused our certificate, or hung up, ends the exchange.
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError
        ):
            await self._answer(stream)

    async def _answer(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(our_role=h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
                continue
            if isinstance(event, h11.Request):
                self.requests.append(event.target.decode())
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if self.stall:
            await trio.sleep_forever()
        headers = [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(self.body))),
            *self.headers,
        ]
        await stream.send_all(
            conn.send(h11.Response(status_code=self.status, headers=headers))
            + (conn.send(h11.Data(data=self.body)) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )
        await stream.aclose()

    def stop(self) -> None:
        """From now on nothing listens on the port: the policy host is unreachable."""
        self.scope.cancel()


async def start_policy_server(
    nursery: trio.Nursery, ca: trustme.CA, server: PolicyServer, name: str = POLICY_HOST
) -> PolicyServer:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with server.scope:
            listeners = await nursery.start(
                functools.partial(
                    trio.serve_ssl_over_tcp,
                    server.handle,
                    0,
                    ctx,
                    host="127.0.0.1",
                    https_compatible=True,
                )
            )
            task_status.started(listeners[0].transport_listener.socket.getsockname()[1])
            await trio.sleep_forever()

    server.port = await nursery.start(run)
    return server


@dataclass
class MailWatcher(Recorder):
    """A Recorder that also notes every EHLO and MAIL FROM: "nothing sent" is then checkable."""

    mails: list[str] = field(default_factory=list)
    ehlos: list[str] = field(default_factory=list)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.ehlos.append(hostname)
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.mails.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"


def leaf_of(cert: trustme.LeafCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())


def ca_cert(ca: trustme.CA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes())


def tlsa(usage: int, selector: int, mtype: int, cert: x509.Certificate) -> str:
    """TLSA rdata text for *cert* ("3 1 1 ab12...")."""
    if selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    else:
        data = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return f"{usage} {selector} {mtype} {data.hex()}"
