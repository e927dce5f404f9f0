"""The ``Authentication-Results:`` header (RFC 8601), and removing forged ones.

The header is rendered by ``authres`` (the reference Python implementation of the
RFC 8601 grammar and its IANA method registry), so every ``ptype.property`` and
quoting rule is right. Stripping needs only the authserv-id of each existing header,
and must work on headers too broken for any parser (a forger need not be
well-formed), so that part is a small tolerant scanner here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import authres
import authres.dmarc

from trio_mta.auth.dkim_verify import DkimResult
from trio_mta.auth.dmarc import DmarcResult
from trio_mta.auth.spf import SpfResult

__all__ = ["authentication_results", "authserv_id", "strip_ours"]

HEADER = b"authentication-results"
_MAX_REASON = 80
_UNSAFE = re.compile(r"[^\x20-\x7e]|[\"\\;]")
# RFC 5322 §2.2.3: unfolding removes a CRLF immediately followed by WSP.
_UNFOLD = re.compile(r"\r\n(?=[ \t])")
# A field ends at a CRLF not followed by WSP (the next line is not a continuation).
_FIELD_END = re.compile(rb"\r\n(?![ \t])")


# RFC 8601 §2.2 pvalue = [ [ local-part ] "@" ] domain-name / value; atext and
# qtext take UTF-8 too (RFC 6532 §3.2).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f\s]"
_DOT_ATOM = rf"(?:{_ATEXT})+(?:\.(?:{_ATEXT})+)*"
_QUOTED = r'"(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*"'
_ADDRESS = re.compile(rf"(?:{_DOT_ATOM}|{_QUOTED})?@{_DOT_ATOM}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _pvalue(text: str) -> str | None:
    """A property value from a peer (HELO, MAIL FROM, d=, s=, From:) safe to render.

    authres quotes a value that is not a token, except one holding an "@",
    which it writes as it is: right for an address, but ``a@b(`` from a HELO
    would open a comment that hides every later result from the reader. Such
    a value is quoted here; control characters, never valid, are dropped.
    """
    text = _CONTROL.sub("", text)
    if not text:
        return None
    if "@" in text and not _ADDRESS.match(text):
        return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'
    return text


def _reason(text: str) -> str | None:
    """A reason safe inside a quoted-string and short enough to read.

    One with an "@" comes quoted already: authres would write it bare, and a
    ``no key at x@y (._domainkey...`` (s= is the signer's) would hide the rest.
    """
    text = _UNSAFE.sub("", text).strip()
    if not text:
        return None
    text = text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."
    return f'"{text}"' if "@" in text else text


def authentication_results(
    authserv: str,
    *,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult] | None,
    dmarc: DmarcResult | None,
    sender: str = "",
    helo: str = "",
) -> bytes:
    """One folded header field, CRLF-terminated; ``none`` when no method ran (§2.2).

    Rendering is remembered: mail from one sender mostly gets the same verdicts.
    """
    return _render(authserv, spf, None if dkim is None else tuple(dkim), dmarc, sender, helo)


@lru_cache(maxsize=1024)
def _render(
    authserv: str,
    spf: SpfResult | None,
    dkim: tuple[DkimResult, ...] | None,
    dmarc: DmarcResult | None,
    sender: str,
    helo: str,
) -> bytes:
    results: list[authres.core.AuthenticationResult] = []
    if spf is not None:
        if spf.identity == "mailfrom":
            results.append(
                authres.SPFAuthenticationResult(
                    result=spf.result, smtp_mailfrom=_pvalue(sender or spf.domain)
                )
            )
        else:
            results.append(
                authres.SPFAuthenticationResult(
                    result=spf.result, smtp_helo=_pvalue(helo or spf.domain)
                )
            )
    if dkim is not None:
        if not dkim:
            results.append(authres.DKIMAuthenticationResult(result="none", reason="no signature"))
        for item in dkim:
            kwargs: dict[str, str] = {}
            for key, tag in (
                ("header_d", item.domain),
                ("header_s", item.selector),
                ("header_a", item.algorithm),
            ):
                if (value := _pvalue(tag)) is not None:
                    kwargs[key] = value
            reason = _reason(item.reason) if item.result != "pass" else None
            results.append(
                authres.DKIMAuthenticationResult(result=item.result, reason=reason, **kwargs)
            )
    if dmarc is not None:
        comment = (
            f"p={dmarc.policy} dis={dmarc.disposition}"
            if dmarc.result in ("pass", "fail")
            else None
        )
        results.append(
            authres.dmarc.DMARCAuthenticationResult(
                result=dmarc.result, result_comment=comment, header_from=_pvalue(dmarc.from_domain)
            )
        )
    if not results:
        return f"Authentication-Results: {authserv}; none\r\n".encode()
    text = str(authres.AuthenticationResultsHeader(authserv_id=authserv, results=results))
    # Fold between result clauses so no line runs past ~78 octets (RFC 5322 §2.1.1).
    return text.replace("; ", ";\r\n\t").encode("utf-8") + b"\r\n"


def authserv_id(value: bytes) -> str | None:
    """The authserv-id of one header value (RFC 8601 §2.2), lower-cased, or None.

    Folding is undone and leading comments are skipped; a quoted-string id is
    unquoted, quoted-pairs included (``"mx.ex\\ample"`` is ``mx.example``, as
    any RFC 5322 reader downstream sees it).
    """
    text = _UNFOLD.sub("", value.decode("utf-8", "replace"))
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
        elif text[i] == "(":
            depth = 0
            while i < n:
                if text[i] == "\\":
                    i += 1
                elif text[i] == "(":
                    depth += 1
                elif text[i] == ")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        else:
            break
    if i >= n:
        return None
    if text[i] == '"':
        chars = []
        i += 1
        while i < n and text[i] != '"':
            if text[i] == "\\" and i + 1 < n:
                i += 1  # quoted-pair: the next character stands for itself
            chars.append(text[i])
            i += 1
        return "".join(chars).strip().lower() or None
    match = re.match(r"[^\s;()\"]+", text[i:])
    return match.group(0).lower() if match else None


def strip_ours(message: bytes, authserv: str) -> bytes:
    """*message* without the Authentication-Results fields that carry *authserv* (§5).

    Works on the raw header block so that everything else stays byte-identical
    (DKIM signatures over the remaining fields still verify): each field is cut
    out with its own CRLFs, nothing is re-joined. A message that starts with an
    empty line has no header fields (RFC 5322 §2.1): all of it is body.
    """
    if message.startswith(b"\r\n"):
        return message
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    if HEADER not in head.lower():
        return message
    ours = authserv.lower()
    kept: list[bytes] = []
    ends = [m.end() for m in _FIELD_END.finditer(head)]
    if not ends or ends[-1] != len(head):
        ends.append(len(head))  # the last field, when the message ends without a CRLF
    for start, field_end in zip([0, *ends[:-1]], ends, strict=True):
        field = head[start:field_end]
        name, colon, value = field.partition(b":")
        if colon and name.strip().lower() == HEADER and authserv_id(value) == ours:
            continue
        kept.append(field)
    return b"".join(kept) + message[len(head) :]
