"""The milters of one SMTP session, in the order configured (SPEC §11).

The session calls one method per SMTP stage and gets ``None`` (go on) or
the SMTP reply to give. Verdicts: accept (this milter is done), continue,
reject (its reply, else ``550 5.7.1``), tempfail (``451 4.7.1``), discard
(the message is acknowledged and dropped). A milter that cannot be used
applies its ``on_error``: ``tempfail`` answers 451 4.7.1 until the session
ends, ``accept`` drops that milter and lets mail flow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from trio_mta import log
from trio_mta.milter import protocol as p
from trio_mta.milter.client import MilterClient, MilterSpec, MilterUnavailable
from trio_mta.milter.message import MilterMessage
from trio_mta.milter.pool import MilterPool
from trio_mta.smtp import Reply

TEMPFAIL = Reply(451, "4.7.1", "Service unavailable - try again later")
REJECT = Reply(550, "5.7.1", "Command rejected")


def smtp_reply(verdict: p.Verdict) -> Reply | None:
    if verdict.reply is not None:
        r = verdict.reply
        return Reply(
            r.code, r.status, r.text or ("Command rejected" if r.code >= 500 else "Try again later")
        )
    if verdict.action == "reject":
        return REJECT
    if verdict.action == "tempfail":
        return TEMPFAIL
    return None


@dataclass
class EndOfMessage:
    """What the milters made of a message: a refusal, a discard, or changes."""

    reply: Reply | None = None
    discard: bool = False
    message: MilterMessage | None = None  # set when headers or body changed
    sender: str | None = None
    sender_args: str = ""
    add_rcpts: list[str] = field(default_factory=list)
    delete_rcpts: list[str] = field(default_factory=list)


@dataclass
class _Entry:
    client: MilterClient
    done: bool = False  # accepted the connection: asks nothing more
    txn_done: bool = False  # accepted the message: nothing more for this transaction


class MilterChain:
    def __init__(
        self,
        specs: tuple[MilterSpec, ...],
        macros: dict[str, str],
        pool: MilterPool,
    ) -> None:
        self.specs = specs
        self.pool = pool
        self.entries: list[_Entry] = []  # filled by connect(), in the order configured
        self._broken: list[MilterClient] = []  # failed: their sockets are closed at the end
        self.macros = dict(macros)
        self.session_reply: Reply | None = None  # a connect/helo verdict, given at MAIL
        self.needs_abort = False
        self.discard = False

    def _active(self) -> Iterator[_Entry]:
        return (e for e in list(self.entries) if not e.done and not e.txn_done)

    def _failed(self, entry: _Entry, stage: str, exc: Exception) -> Reply | None:
        spec = entry.client.spec
        log.warning(
            "milter.error", milter=spec.address, stage=stage, error=str(exc), on_error=spec.on_error
        )
        self.entries.remove(entry)
        self._broken.append(entry.client)
        if spec.on_error == "accept":
            return None
        self.session_reply = TEMPFAIL
        return TEMPFAIL

    async def _stage(
        self,
        stage: str,
        data: bytes = b"",
        macros: dict[str, str] | None = None,
        *,
        encoded: bytes | None = None,
    ) -> p.Verdict | Reply | None:
        """Run one stage on every active milter; the first refusal wins."""
        for entry in list(self._active()):
            try:
                verdict = await self._send_stage(entry, stage, data, macros, encoded)
            except (MilterUnavailable, p.MilterProtocolError) as exc:
                failed = self._failed(entry, stage, exc)
                if failed is not None:
                    return failed
                continue
            if verdict.action == "accept":
                if stage in ("connect", "helo"):
                    entry.done = True
                elif stage not in ("rcpt",):
                    entry.txn_done = True
            elif verdict.action in ("reject", "tempfail", "discard"):
                log.event(
                    "milter.verdict",
                    milter=entry.client.spec.address,
                    stage=stage,
                    action=verdict.action,
                    reply=str(smtp_reply(verdict) or "") or None,
                )
                return verdict
        return None

    async def _send_stage(
        self,
        entry: _Entry,
        stage: str,
        data: bytes,
        macros: dict[str, str] | None,
        encoded: bytes | None,
    ) -> p.Verdict:
        client = entry.client
        try:
            return await client.exchange(client.proto.stage(stage, data, macros, encoded=encoded))
        except MilterUnavailable:
            if stage != "connect" or not client.kept:
                raise
        # A kept connection (milter/pool.py) the milter closed after the pool found it
        # fit: nothing of this session has reached the milter yet, so once more, afresh.
        log.event("milter.reconnect", milter=client.spec.address)
        self._broken.append(client)
        entry.client = client = MilterClient(client.spec)
        await client.open()
        return await client.exchange(client.proto.stage(stage, data, macros, encoded=encoded))

    async def connect(self, hostname: str, client_ip: str, client_port: int) -> None:
        for spec in self.specs:
            self.entries.append(_Entry(await self.pool.acquire(spec)))
        for entry in list(self.entries):
            try:
                await entry.client.open()
            except MilterUnavailable as exc:
                self._failed(entry, "connect", exc)
        result = await self._stage(
            "connect",
            macros=self.macros,
            encoded=p.encode_connect(hostname, client_ip, client_port),
        )
        self._session_verdict(result)

    def _session_verdict(self, result: p.Verdict | Reply | None) -> None:
        if isinstance(result, p.Verdict):
            self.session_reply = smtp_reply(result) or REJECT
        elif result is not None:
            self.session_reply = result

    async def helo(self, name: str) -> None:
        if self.session_reply is None:
            self._session_verdict(await self._stage("helo", p.cstrings(name)))

    def reset(self) -> None:
        """The transaction ended without EOM (RSET, refused DATA): ABORT before the next."""
        self.needs_abort = True

    async def _abort(self) -> None:
        if not self.needs_abort:
            return
        self.needs_abort = False
        for entry in list(self.entries):
            entry.txn_done = False
            if entry.done:
                continue
            try:
                await entry.client.exchange(entry.client.proto.abort())
            except MilterUnavailable as exc:
                self._failed(entry, "abort", exc)

    def _refusal(self, result: p.Verdict | Reply | None) -> Reply | None:
        if isinstance(result, p.Verdict):
            if result.action == "discard":
                self.discard = True
                return None
            return smtp_reply(result)
        return result

    async def mail(self, sender: str, args: list[str], macros: dict[str, str]) -> Reply | None:
        await self._abort()
        for entry in self.entries:
            entry.txn_done = False
        self.discard = False
        self.needs_abort = True  # until the end of the message
        if self.session_reply is not None:
            return self.session_reply
        return self._refusal(await self._stage("mail", p.cstrings(f"<{sender}>", *args), macros))

    async def rcpt(self, address: str, args: list[str]) -> Reply | None:
        if self.session_reply is not None:
            return self.session_reply
        result = await self._stage(
            "rcpt", p.cstrings(f"<{address}>", *args), {"{rcpt_addr}": address}
        )
        return self._refusal(result)

    async def end_of_message(self, message: MilterMessage, macros: dict[str, str]) -> EndOfMessage:
        self.needs_abort = False
        outcome = EndOfMessage()
        if self.session_reply is not None:
            outcome.reply = self.session_reply
            return outcome
        for entry in list(self._active()):
            try:
                verdict = await self._one_message(entry, message, macros)
            except (MilterUnavailable, p.MilterProtocolError) as exc:
                if self._failed(entry, "eom", exc) is not None:
                    outcome.reply = TEMPFAIL
                    return outcome
                continue
            if verdict.action == "discard" or self.discard:
                outcome.discard = True
                return outcome
            if verdict.action in ("reject", "tempfail"):
                log.event(
                    "milter.verdict",
                    milter=entry.client.spec.address,
                    stage="eom",
                    action=verdict.action,
                    reply=str(smtp_reply(verdict)),
                )
                outcome.reply = smtp_reply(verdict)
                return outcome
            message.apply(verdict.modifications)
            for mod in verdict.modifications:
                if mod.kind == "change_from":
                    outcome.sender, outcome.sender_args = mod.value.strip("<>"), mod.args
                elif mod.kind == "add_rcpt":
                    outcome.add_rcpts.append(mod.value.strip("<>"))
                elif mod.kind == "delete_rcpt":
                    outcome.delete_rcpts.append(mod.value.strip("<>"))
        for entry in self.entries:
            entry.txn_done = False
        if self.discard:
            outcome.discard = True
        if message.changed:
            outcome.message = message
        return outcome

    async def _one_message(
        self, entry: _Entry, message: MilterMessage, macros: dict[str, str]
    ) -> p.Verdict:
        """DATA, the headers, EOH, the body in chunks, EOM: the verdict of the first refusal."""
        client = entry.client
        proto = client.proto
        steps: list[tuple[str, bytes, dict[str, str] | None]] = [("data", b"", macros)]
        lead = bool(proto.protocol & p.HDR_LEADSPC)
        for h in message.headers:
            value = h.value if lead else h.value.removeprefix(" ")
            steps.append(("header", p.cstrings(h.name, value), None))
        steps.append(("eoh", b"", None))
        for stage, data, m in steps:
            verdict = await client.exchange(proto.stage(stage, data, m))
            if verdict.action != "continue":
                return verdict
        if proto.wants("body"):
            chunks = message.body_chunks()
            while True:
                # A body in memory needs no thread; a spool file is read in one.
                chunk = (
                    next(chunks, None)
                    if message.path is None
                    else await trio.to_thread.run_sync(next, chunks, None)
                )
                if chunk is None:
                    break
                skipped = False
                for start in range(0, len(chunk), p.BODY_CHUNK):
                    piece = chunk[start : start + p.BODY_CHUNK]
                    verdict = await client.exchange(proto.stage("body", piece))
                    if verdict.action == "skip":
                        skipped = True
                        break
                    if verdict.action != "continue":
                        return verdict
                if skipped:
                    break
        return await client.exchange(proto.stage("eom", b"", macros))

    async def close(self) -> None:
        """QUIT each milter, or hand its connection back to the pool for the next session
        (after an ABORT when a transaction was left open)."""
        entries, self.entries = self.entries, []
        for entry in entries:
            client = entry.client
            if self.needs_abort and not entry.done and client.spec.reuse_connections:
                with contextlib.suppress(MilterUnavailable):
                    await client.exchange(client.proto.abort())
            await self.pool.release(client)
        broken, self._broken = self._broken, []
        for client in broken:
            await client.discard()
