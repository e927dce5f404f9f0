#!/usr/bin/env python3
"""atheris harness for the DMARC record parser and alignment (``trio_mta.auth.dmarc``).

Oracle: ``parse_record``, ``org_domain``, ``aligned`` and ``evaluate`` never raise
(an unusable record is None, nothing is documented to raise), and:

* ``parse_record`` agrees with a reference of RFC 7489 written here: ``v=DMARC1``
  exactly, first (§6.3); tags split at ``;`` and ``=``, names lower-cased, the first
  of a repeated tag counts, whitespace around names and values ignored; ``p``/``sp``
  none, quarantine or reject in any case, ``sp`` defaulting to ``p``; a missing or
  invalid ``p``, or an invalid ``sp``, makes the record unusable unless ``rua`` holds a
  syntactically valid URI, and then it counts as ``p=none`` (§6.6.3 step 6); ``pct``
  1-3 ASCII digits up to 100, anything else the default 100 (§6.3: syntax errors fall
  back to defaults); ``adkim``/``aspf`` ``s`` in any case, else ``r``. So on success p
  and sp are policies, pct is in 0..100 and adkim/aspf are r or s.
* ``org_domain`` is the name (lower-case, final dots dropped) or a suffix of it at a
  label boundary, and its own organizational domain.
* ``aligned`` is reflexive, symmetric, and strict alignment implies relaxed.
* ``evaluate`` passes with an SPF or DKIM pass exactly when ``aligned`` says that
  domain is aligned, and otherwise fails with the policy that applies (p at the
  record's domain, sp below it), or a milder one only when pct says so.

The input is UTF-8 text: the record, then optionally NUL and a domain, NUL and a
From: domain (the domain the record was found at); missing domains are example.org.

    python fuzz/fuzz_dmarc.py fuzz/corpus-dmarc fuzz/seeds/dmarc
"""

from __future__ import annotations

import re
import sys

import atheris

# Imported first, so only dmarc and the Public Suffix List are instrumented: the
# resolver, dnspython and trio behind them take half a minute and are not the target.
from trio_mta.auth.dkim_verify import DkimResult
from trio_mta.auth.spf import SpfResult
from trio_mta.dns import Resolver  # noqa: F401

with atheris.instrument_imports():
    from trio_mta.auth.dmarc import DmarcPolicy, aligned, evaluate, org_domain, parse_record

_POLICIES = ("none", "quarantine", "reject")
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}  # §6.6.4
_VERSION = re.compile(r"v\s*=\s*DMARC1\Z")
_PCT = re.compile(r"[0-9]{1,3}\Z")
# RFC 7489 §6.4 dmarc-uri: an RFC 3986 URI (scheme ":" ...; "!" and "," percent-encoded),
# then an optional size limit.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x22-\x2b\x2d-\x7e]+(?:![0-9]+[kmgtKMGT]?)?\Z")


def _reference(text: str, domain: str) -> DmarcPolicy | None:
    version, *rest = text.split(";")
    if not _VERSION.match(version.strip()):
        return None
    tags: dict[str, str] = {}
    for part in rest:
        name, eq, value = part.partition("=")
        if eq and name.strip().lower() not in tags:
            tags[name.strip().lower()] = value.strip()
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in _POLICIES or sp not in _POLICIES:
        rua = tags.get("rua", "").split(",")
        if not any(_URI.match(uri.strip()) for uri in rua):
            return None
        p = sp = "none"
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if _PCT.match(pct_text) and int(pct_text) <= 100 else 100
    adkim = "s" if tags.get("adkim", "").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "").lower() == "s" else "r"
    return DmarcPolicy(domain, p, sp, pct, adkim, aspf)


def _check_record(text: str, domain: str) -> DmarcPolicy | None:
    policy = parse_record(text, domain)
    expected = _reference(text, domain)
    if policy != expected:
        raise AssertionError(f"{text!r}: {policy!r}, RFC 7489 {expected!r}")
    if policy is not None and not (
        policy.p in _POLICIES
        and policy.sp in _POLICIES
        and type(policy.pct) is int
        and 0 <= policy.pct <= 100
        and policy.adkim in ("r", "s")
        and policy.aspf in ("r", "s")
    ):
        raise AssertionError(f"{text!r}: {policy!r}")
    return policy


def _check_domains(a: str, b: str) -> None:
    for name in (a, b):
        org = org_domain(name)
        plain = name.lower().rstrip(".")
        if org != plain and not plain.endswith("." + org):
            raise AssertionError(f"org_domain({name!r}) is {org!r}")
        if org_domain(org) != org:
            raise AssertionError(f"org_domain({name!r}) is {org!r}, whose is {org_domain(org)!r}")
        for mode in ("r", "s"):
            twin = name.upper() + "." if name.isascii() else name + "."
            if not aligned(name, name, mode) or not aligned(twin, name, mode):
                raise AssertionError(f"{name!r} is not {mode}-aligned with itself")
    for mode in ("r", "s"):
        if aligned(a, b, mode) != aligned(b, a, mode):
            raise AssertionError(f"{a!r} and {b!r}: {mode}-alignment is not symmetric")
    if aligned(a, b, "s") and not aligned(a, b, "r"):
        raise AssertionError(f"{a!r} and {b!r}: strictly aligned but not relaxed")


def _check_evaluate(policy: DmarcPolicy, identifier: str, from_domain: str, draw: float) -> None:
    spf = SpfResult("pass", "mailfrom", identifier)
    dkim = DkimResult("pass", identifier, "sel", "rsa-sha256", "")
    for result, mode in (
        (evaluate(from_domain, policy, spf, [], sample=draw), policy.aspf),
        (evaluate(from_domain, policy, None, [dkim], sample=draw), policy.adkim),
    ):
        if (result.result == "pass") != aligned(identifier, from_domain, mode):
            raise AssertionError(f"{identifier!r} for {from_domain!r} under {policy!r}: {result}")
    failed = evaluate(from_domain, policy, None, [], sample=draw)
    applies = policy.p if policy.domain == from_domain else policy.sp
    disposition = applies if draw * 100 < policy.pct else _MILDER[applies]
    if (failed.result, failed.policy, failed.disposition) != ("fail", applies, disposition):
        raise AssertionError(f"{policy!r}, sample {draw}, for {from_domain!r}: {failed}")


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    record, _, names = text.partition("\x00")
    identifier, _, from_domain = names.partition("\x00")
    identifier = identifier or "example.org"
    from_domain = from_domain or "example.org"
    _check_domains(identifier, from_domain)
    policy = _check_record(record, from_domain)
    if policy is not None:
        draw = (data[-1] if data else 0) / 256
        _check_evaluate(policy, identifier, from_domain, draw)
        _check_evaluate(policy, identifier, "sub." + from_domain, draw)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
