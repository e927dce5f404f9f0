#!/usr/bin/env python3
"""atheris harness for the Authentication-Results fields we strip and add (RFC 8601).

Byte 0 picks the mode. Without bit 2 the rest is a message and bits 0-1 pick
the authserv-id X to strip (ours, ours in other case, the id of the message's
first Authentication-Results field, someone else's); bit 3 turns every LF and
CR into CRLF first (what SMTP lets through: the server refuses bare ones).

Oracle for ``strip_ours(message, X)``: no exception; the result equals a
reference written here from RFC 5322 §2.2 (the header section is the lines
before the first empty line, none if the message starts with one; a field is
a line and the lines after it that start with WSP; every byte after the header
section is body), in which exactly the fields named Authentication-Results
(any case, white space around the name ignored) whose ``authserv_id`` is X are
left out and every other byte stays, in order; stripping twice changes nothing;
a message without such fields comes back as it was.

Oracle for ``authserv_id``: on every value that is well-formed up to its first
";" (RFC 8601 §2.2: [CFWS] authserv-id [CFWS [version [CFWS]]] ";", the id an
RFC 2045 token or an RFC 5322 quoted-string, quoted-pairs unescaped, folding
undone; white space just inside the quotes ignored), it is that id, lower-cased.

With bit 2 the rest drives ``authentication_results``: our host name, SPF,
DKIM and DMARC verdicts over values a peer controls (HELO argument and MAIL
FROM path as our SMTP parser accepts them, d=/s=/a= as our DKIM-Signature
scanner reads them, the From: domain as ``from_domains`` finds it). Oracle:
one CRLF-terminated field, ``authserv_id`` of its value is our host name,
``strip_ours`` removes it, and authres's own RFC 8601 parser reads it back
with our id and the very methods and results we rendered (none hidden in a
comment or a smuggled clause, none added).

    python fuzz/fuzz_authres.py fuzz/corpus-authres fuzz/seeds/authres
"""

from __future__ import annotations

import re
import sys

import atheris

# The coverage map holds what is under test, results.py and authres (renderer and
# oracle); what only makes the inputs (our SMTP parser, the DKIM and From:
# scanners, with dkimpy, dnspython, pyspf and trio behind them) is not instrumented.
with atheris.instrument_imports():
    import authres
    import authres.dmarc

from trio_mta.auth.dkim_verify import DkimResult, signatures
from trio_mta.auth.dmarc import DmarcResult
from trio_mta.auth.signing import from_domains
from trio_mta.auth.spf import SpfResult
from trio_mta.smtp import CommandError, Ehlo, Mail, parse_command

with atheris.instrument_imports():
    from trio_mta.auth.results import authentication_results, authserv_id, strip_ours

OURS = "mx.example.test"
_OTHERS = (OURS, "MX.Example.TEST", None, "other.example")
_NAME = b"authentication-results"
_WSP = " \t"
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_CONTEXT = authres.FeatureContext(authres.dmarc)


# ------------------------------------------------------------------ references
def _skip_cfws(text: str, i: int) -> int | None:
    """Index after RFC 5322 CFWS at ``i`` (folding already undone); None if a comment never ends."""
    while i < len(text):
        if text[i] in _WSP:
            i += 1
        elif text[i] == "(":
            depth = 0
            while True:
                if i >= len(text):
                    return None
                char = text[i]
                i += 1
                if char == "\\":
                    i += 1
                elif char == "(":
                    depth += 1
                elif char == ")":
                    depth -= 1
                    if depth == 0:
                        break
        else:
            break
    return i


def _token_char(char: str) -> bool:
    if char.isascii():
        return 0x20 < ord(char) < 0x7F and char not in _TSPECIALS
    return not char.isspace()  # RFC 6532: UTF-8 where ASCII text is allowed


def _rfc_authserv_id(value: bytes) -> str | None:
    """The authserv-id of a value well-formed up to its first ";", lower-cased; else None."""
    text = value.decode("utf-8", "replace")
    text = re.sub(r"\r\n(?=[ \t])|\r\n\Z", "", text)  # RFC 5322 §2.2.3 unfolding
    i = _skip_cfws(text, 0)
    if i is None or i >= len(text):
        return None
    if text[i] == '"':
        content = []
        i += 1
        while True:
            if i >= len(text):
                return None
            char = text[i]
            i += 1
            if char == '"':
                break
            if char == "\\":
                if i >= len(text):
                    return None
                char = text[i]
                i += 1
            if char.isascii() and ((ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F):
                return None
            content.append(char)
        ident = "".join(content).strip()
    else:
        start = i
        while i < len(text) and _token_char(text[i]):
            i += 1
        ident = text[start:i]
    if not ident:
        return None
    j = _skip_cfws(text, i)
    if j is not None and j > i and j < len(text) and text[j].isdigit() and text[j].isascii():
        while j < len(text) and text[j] in "0123456789":
            j += 1
        j = _skip_cfws(text, j)
    if j is None or j >= len(text) or text[j] != ";":
        return None
    return ident.lower()


def _split_message(message: bytes) -> tuple[list[bytes], bytes]:
    """RFC 5322 §2.2: (fields of the header section, each with its CRLFs; the rest)."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(message):
        end = message.find(b"\r\n", pos)
        line = message[pos:] if end < 0 else message[pos : end + 2]
        if line == b"\r\n":
            break
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
        pos += len(line)
    return fields, message[pos:]


def _is_ar(field: bytes) -> bool:
    name, colon, _ = field.partition(b":")
    return bool(colon) and name.strip().lower() == _NAME


def _reference_strip(message: bytes, authserv: str) -> bytes:
    fields, rest = _split_message(message)
    ours = authserv.lower()
    kept = [f for f in fields if not (_is_ar(f) and authserv_id(f.partition(b":")[2]) == ours)]
    return b"".join(kept) + rest


# ---------------------------------------------------------------------- strip
def _check_strip(message: bytes, pick: int) -> None:
    fields, _ = _split_message(message)
    for field in fields:
        if _is_ar(field):
            value = field.partition(b":")[2]
            got = authserv_id(value)
            expected = _rfc_authserv_id(value)
            if expected is not None and got != expected:
                raise AssertionError(f"{value!r}: authserv-id {got!r}, RFC 8601 says {expected!r}")
    authserv = _OTHERS[pick]
    if authserv is None:
        first = next((f for f in fields if _is_ar(f)), None)
        authserv = (first and authserv_id(first.partition(b":")[2])) or OURS
    stripped = strip_ours(message, authserv)
    expected_message = _reference_strip(message, authserv)
    if stripped != expected_message:
        raise AssertionError(
            f"{message!r} without {authserv!r}: {stripped!r}, expected {expected_message!r}"
        )
    if strip_ours(stripped, authserv) != stripped:
        raise AssertionError(f"{message!r}: stripping {authserv!r} twice changes it again")


# --------------------------------------------------------------------- render
def _render_check(fdp: atheris.FuzzedDataProvider) -> None:
    ours = fdp.PickValueInList([OURS, "MX.Example.Test", "a.b", "mail-1.x-y.example"])
    helo = ""
    sender = ""
    try:
        hello = parse_command(b"EHLO " + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))
        if isinstance(hello, Ehlo):
            helo = hello.domain
    except CommandError:
        helo = "client.example"
    try:
        mail = parse_command(b"MAIL FROM:<" + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60)) + b">")
        if isinstance(mail, Mail):
            sender = str(mail.path)
    except CommandError:
        pass
    spf = None
    if fdp.ConsumeBool():
        mailfrom = bool(sender) and fdp.ConsumeBool()
        spf = SpfResult(
            fdp.PickValueInList(["pass", "fail", "softfail", "neutral", "none", "temperror"]),
            "mailfrom" if mailfrom else "helo",
            (sender.rpartition("@")[2] if mailfrom else helo) or "x.example",
        )
    dkim: list[DkimResult] | None = None
    if fdp.ConsumeBool():
        dkim = []
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            tags = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
            found = signatures(b"DKIM-Signature: v=1; b=abc; " + tags + b"\r\n\r\n")
            sig = found[0] if found else None
            result = fdp.PickValueInList(["pass", "fail", "neutral", "permerror", "temperror"])
            reason = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 30))
            if sig is None:
                dkim.append(DkimResult("permerror", "", "", "", "", "malformed signature"))
            else:
                dkim.append(DkimResult(result, sig.domain, sig.selector, sig.algorithm, "", reason))
    dmarc = None
    if fdp.ConsumeBool():
        from_value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60))
        domains = from_domains([[b"From", from_value]])
        result = fdp.PickValueInList(["pass", "fail", "none", "temperror", "permerror"])
        dmarc = DmarcResult(
            result,
            domains[0] if domains else "",
            fdp.PickValueInList(["none", "quarantine", "reject"]),
            fdp.PickValueInList(["none", "quarantine", "reject"]),
        )
    header = authentication_results(ours, spf=spf, dkim=dkim, dmarc=dmarc, sender=sender, helo=helo)
    where = f"{header!r}"
    fields, rest = _split_message(header)
    if len(fields) != 1 or rest or not header.endswith(b"\r\n"):
        raise AssertionError(f"{where}: not one CRLF-terminated field")
    value = header.partition(b":")[2]
    if authserv_id(value) != ours.lower():
        raise AssertionError(f"{where}: authserv-id {authserv_id(value)!r}, not {ours!r}")
    if strip_ours(header + b"\r\nbody\r\n", ours) != b"\r\nbody\r\n":
        raise AssertionError(f"{where}: strip_ours leaves our own field")
    rendered = []
    if spf is not None:
        rendered.append(("spf", spf.result))
    for item in dkim if dkim is not None else ():
        rendered.append(("dkim", item.result))
    if dkim == []:
        rendered.append(("dkim", "none"))
    if dmarc is not None:
        rendered.append(("dmarc", dmarc.result))
    # authres reads ASCII only; RFC 6532 allows UTF-8 wherever it allows ASCII text.
    unfolded = value.decode("utf-8").replace("\r\n", "")
    ascii_text = "".join(c if c.isascii() else "x" for c in unfolded)
    try:
        parsed = _CONTEXT.parse_value(ascii_text)
    except authres.AuthResError as exc:
        raise AssertionError(f"{where}: authres cannot read it back: {exc!r}") from None
    back = [(r.method, r.result) for r in parsed.results]
    if parsed.authserv_id != ours.lower() or back != (rendered or []):
        raise AssertionError(f"{where}: authres reads {parsed.authserv_id!r} {back!r}")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 4:
        _render_check(atheris.FuzzedDataProvider(data[1:]))
        return
    message = data[1:]
    if data[0] & 8:
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    _check_strip(message, data[0] & 3)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
