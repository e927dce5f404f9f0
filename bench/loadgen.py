"""Trio SMTP load generator for what smtp-source cannot measure.

smtp-source (C, cheap) gives the throughput figures; this generator gives the
latency of each DATA reply and the idle-connection test. It speaks like
smtp-source does by default: one connection per message, no pipelining
(EHLO, MAIL, RCPT, DATA, QUIT), so the two load shapes are comparable.

The DATA latency is taken from just before the final ``.<CRLF>`` is sent until
the whole reply has arrived: the server's end-of-data work (parse, queue
commit with fsync, reply), not the time spent streaming the body.

    python bench/loadgen.py send --port 2603 -s 10 -m 300 -l 1024
    python bench/loadgen.py idle --port 2603 -n 10000 --server-pid PID

Both print one JSON object on stdout. Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import resource
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

CONNECT_CONCURRENCY = 256  # idle test: connects in flight at once (server backlog is 1024)


class SMTPError(Exception):
    """The server answered something other than what the step expects."""


# STARTTLS measurement: no verification (the server's certificate is self-signed),
# like an opportunistic MTA; the session cache is off so every connection pays a
# full handshake, as one connection per message between strangers does.
_TLS = ssl.create_default_context()
_TLS.check_hostname = False
_TLS.verify_mode = ssl.CERT_NONE


class Conn:
    """One SMTP client connection: read complete (possibly multi-line) replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.raw = stream  # the TCP stream, also under TLS
        self.stream: trio.abc.Stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        return cls(await trio.open_tcp_stream(host, port))

    async def reply(self) -> tuple[int, bytes]:
        """Return (code, full reply text); the last line has a space after the code."""
        start = 0
        while True:
            nl = self.buf.find(b"\n", start)
            if nl >= 0:
                line = self.buf[start : nl + 1]
                if len(line) < 4 or line[3:4] != b"-":
                    text = bytes(self.buf[: nl + 1])
                    del self.buf[: nl + 1]
                    try:
                        return int(text[start : start + 3]), text
                    except ValueError:
                        raise SMTPError(f"malformed reply {text[:80]!r}") from None
                start = nl + 1
                continue
            data = await self.stream.receive_some(65536)
            if not data:
                raise SMTPError("connection closed by server")
            self.buf += data

    async def expect(self, code: int, step: str) -> bytes:
        got, text = await self.reply()
        if got != code:
            raise SMTPError(f"{step}: expected {code}, got {text.decode('latin-1').strip()!r}")
        return text

    async def command(self, line: bytes, code: int, step: str) -> bytes:
        await self.stream.send_all(line)
        return await self.expect(code, step)

    async def aclose(self) -> None:
        await self.stream.aclose()


def make_body(size: int, sender: str, rcpt: str) -> bytes:
    """Headers plus `size` bytes of payload in 80-byte CRLF lines, like ``smtp-source -l``."""
    headers = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: trio_mta bench\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n"
    )
    lines = []
    left = size
    n = 0
    while left > 0:
        n += 1
        chunk = min(80, left)
        text = (str(n % 10) + "X" * 77)[: max(chunk - 2, 0)]
        lines.append(text + "\r\n")
        left -= chunk
    return headers.encode() + "".join(lines).encode()


async def transaction(
    host: str,
    port: int,
    sender: str,
    rcpt: str,
    body: bytes,
    starttls: bool = False,
    handshakes: list[float] | None = None,
) -> float:
    """One message over a fresh connection; returns the DATA-reply latency in seconds.

    With ``starttls`` the session upgrades after EHLO (RFC 3207) and the time
    from STARTTLS to the post-TLS EHLO reply goes into ``handshakes``.
    """
    conn = await Conn.open(host, port)
    try:
        await conn.expect(220, "banner")
        await conn.command(b"EHLO loadgen.bench.test\r\n", 250, "EHLO")
        if starttls:
            t_tls = time.perf_counter()
            await conn.command(b"STARTTLS\r\n", 220, "STARTTLS")
            tls = trio.SSLStream(conn.stream, _TLS, server_hostname=host)
            await tls.do_handshake()
            conn.stream = tls
            await conn.command(b"EHLO loadgen.bench.test\r\n", 250, "EHLO after TLS")
            if handshakes is not None:
                handshakes.append(time.perf_counter() - t_tls)
        await conn.command(f"MAIL FROM:<{sender}>\r\n".encode(), 250, "MAIL")
        await conn.command(f"RCPT TO:<{rcpt}>\r\n".encode(), 250, "RCPT")
        await conn.command(b"DATA\r\n", 354, "DATA")
        await conn.stream.send_all(body)
        t0 = time.perf_counter()
        await conn.stream.send_all(b".\r\n")
        await conn.expect(250, "end of DATA")
        latency = time.perf_counter() - t0
        await conn.command(b"QUIT\r\n", 221, "QUIT")
        return latency
    finally:
        await conn.aclose()


@dataclass
class SendResult:
    sessions: int
    messages: int
    size: int
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    handshakes: list[float] = field(default_factory=list)
    wall: float = 0.0

    def summary(self) -> dict[str, object]:
        lat = sorted(self.latencies)
        return {
            "sessions": self.sessions,
            "messages": self.messages,
            "size": self.size,
            "ok": self.ok,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "wall_s": round(self.wall, 4),
            "accepted_per_s": round(self.ok / self.wall, 2) if self.wall > 0 else None,
            "p50_ms": round(1000 * percentile(lat, 50), 3) if lat else None,
            "p99_ms": round(1000 * percentile(lat, 99), 3) if lat else None,
            "max_ms": round(1000 * lat[-1], 3) if lat else None,
            "tls_handshake_p50_ms": (
                round(1000 * percentile(sorted(self.handshakes), 50), 3)
                if self.handshakes
                else None
            ),
        }


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100)
    return ordered[int(rank) - 1]


async def run_send(
    host: str,
    port: int,
    sessions: int,
    messages: int,
    size: int,
    sender: str,
    rcpt: str,
    timeout: float,
    starttls: bool = False,
) -> SendResult:
    """`sessions` workers share `messages` transactions, one connection each."""
    body = make_body(size, sender, rcpt)
    result = SendResult(sessions, messages, size)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < messages:
            next_index += 1
            try:
                with trio.fail_after(timeout):
                    latency = await transaction(
                        host, port, sender, rcpt, body, starttls, result.handshakes
                    )
            except (OSError, SMTPError, trio.TooSlowError) as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                await trio.sleep(0.01)  # a refusing server must not become a busy loop
                continue
            result.ok += 1
            result.latencies.append(latency)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(sessions):
            nursery.start_soon(worker)
    result.wall = time.perf_counter() - t0
    return result


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a ``[server] workers`` supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(child) for child in (task / "children").read_text().split())
    return out


def read_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM etc. in KiB, summed over the process and its children (empty when gone)."""
    out: dict[str, int] = {}
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.startswith("Vm"):
                        out[key] = out.get(key, 0) + int(value.split()[0])
        except (OSError, ValueError, IndexError):
            if member == pid:
                return {}
    return out


def raise_nofile(want: int) -> int:
    """Lift our soft RLIMIT_NOFILE towards the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(max(soft, want), hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return int(target)


async def run_idle(
    host: str,
    port: int,
    count: int,
    server_pid: int | None,
    sender: str,
    rcpt: str,
    timeout: float,
    hold: float,
) -> dict[str, object]:
    """Open `count` idle connections (each reads its banner), then time one full transaction."""
    limit = raise_nofile(count + 256)
    conns: list[Conn] = []
    errors: list[str] = []
    gate = trio.CapacityLimiter(CONNECT_CONCURRENCY)
    out: dict[str, object] = {"requested": count, "client_nofile": limit}
    before = read_status(server_pid) if server_pid else {}

    async def open_one() -> None:
        async with gate:
            try:
                with trio.fail_after(timeout):
                    conn = await Conn.open(host, port)
                    try:
                        await conn.expect(220, "banner")
                    except BaseException:
                        conn.raw.socket.close()
                        raise
                    conns.append(conn)
            except (OSError, SMTPError, trio.TooSlowError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(open_one)
        out["open_s"] = round(time.perf_counter() - t0, 3)
        out["opened"] = len(conns)
        out["open_errors"] = len(errors)
        out["first_errors"] = errors[:5]
        if hold > 0:
            await trio.sleep(hold)  # let the server settle before sampling its RSS
        body = make_body(1024, sender, rcpt)
        t1 = time.perf_counter()
        try:
            with trio.fail_after(timeout):
                latency = await transaction(host, port, sender, rcpt, body)
            out["new_client"] = "ok"
            out["new_client_s"] = round(time.perf_counter() - t1, 4)
            out["new_client_data_ms"] = round(1000 * latency, 3)
        except (OSError, SMTPError, trio.TooSlowError) as exc:
            out["new_client"] = f"{type(exc).__name__}: {exc}"
        # the idle ones must still be open: a NOOP on a sample of them answers 250
        sample = conns[:: max(1, len(conns) // 20)]
        alive = 0
        for conn in sample:
            try:
                with trio.fail_after(timeout):
                    await conn.command(b"NOOP\r\n", 250, "NOOP")
                alive += 1
            except (OSError, SMTPError, trio.TooSlowError):
                pass
        out["idle_alive_sample"] = f"{alive}/{len(sample)}"
        if server_pid:
            status = read_status(server_pid)
            out["server_rss_before_kib"] = before.get("VmRSS")
            out["server_rss_kib"] = status.get("VmRSS")
            out["server_hwm_kib"] = status.get("VmHWM")
    finally:
        with trio.CancelScope(shield=True):
            for conn in conns:
                conn.raw.socket.close()
    return out


def loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise argparse.ArgumentTypeError(f"{host}: only loopback addresses are allowed")
    return host


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("send", "idle"):
        p = sub.add_parser(name)
        p.add_argument("--host", type=loopback, default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("-f", dest="sender", default="a@bench.test")
        p.add_argument("-t", dest="rcpt", default="u@bench.test")
        p.add_argument("--timeout", type=float, default=60.0, help="per transaction / connect")
        if name == "send":
            p.add_argument("-s", dest="sessions", type=int, default=1)
            p.add_argument("-m", dest="messages", type=int, default=100)
            p.add_argument("-l", dest="size", type=int, default=1024)
            p.add_argument(
                "--starttls",
                action="store_true",
                help="upgrade every session with STARTTLS after EHLO",
            )
        else:
            p.add_argument("-n", dest="count", type=int, default=10000)
            p.add_argument("--server-pid", type=int)
            p.add_argument(
                "--hold",
                type=float,
                default=1.0,
                help="seconds to wait with all connections open before measuring",
            )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.cmd == "send":
        res = trio.run(
            run_send,
            a.host,
            a.port,
            a.sessions,
            a.messages,
            a.size,
            a.sender,
            a.rcpt,
            a.timeout,
            a.starttls,
        )
        print(json.dumps(res.summary()), flush=True)
        return 0 if not res.errors else 1
    out = trio.run(
        run_idle, a.host, a.port, a.count, a.server_pid, a.sender, a.rcpt, a.timeout, a.hold
    )
    print(json.dumps(out), flush=True)
    return 0 if out.get("new_client") == "ok" and not out.get("open_errors") else 1


if __name__ == "__main__":
    sys.exit(main())
