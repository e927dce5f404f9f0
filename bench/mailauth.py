"""The mail authentication column of bench/inbound.py: what signing and verifying cost.

    python bench/inbound.py --dkim ed25519          # signing, Ed25519, 50 sessions
    python bench/inbound.py --dkim ed25519 --dkim rsa --verify -R 5   # all three
    python bench/inbound.py --rspamd          # one milter: rspamd
    python bench/inbound.py --rspamd --rspamd-fresh   # and without reuse_connections

Each comparison runs the same trio_mta twice per repetition, without and with the
feature, interleaved so both see the same machine noise, with smtp-source sending
one fixed 1 KiB message file (-F) over one connection per message:

- signing: loopback is trusted (a submission), ``[[dkim.sign]]`` for bench.test or not;
- verifying: loopback untrusted, the message DKIM-signed (Ed25519) by bench.test, with
  SPF, DKIM key and DMARC records on a loopback DNS server (tests/dnsserver.py);
  ``[verify]`` all off vs all on. The resolver caches the answers (TTL 60 s).

- a milter (issue 13, ``--rspamd``): loopback untrusted as an MX sees the internet
  (SPF, DKIM and DMARC checked in both runs against the loopback name server), the
  same plain message, with or without ``[[milter]]`` pointing at a private rspamd
  (tests/milterd.py) set up as a production one runs: one scanning proxy per core
  and hyperscan for its regexes (the tests turn both down so that rspamd starts in
  seconds). The first start compiles the hyperscan databases (minutes; kept in
  ~/.cache/trio-mta-bench/). ``[[milter]]`` is as docs/milters.md writes it for
  rspamd, with ``reuse_connections = true``; ``--rspamd-fresh`` adds the comparison
  with the default, a new milter connection for every SMTP session.

The figure is delivered msg/s (until every message is in the Maildir), medians of R,
and the median of the R paired ratios (each "with" run over the "without" run next
to it, which shared its minute of machine noise; the order alternates from one
repetition to the next). Server CPU per message (all
its threads, from /proc) is shown too: on a loaded machine it moves less than
throughput does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOMAIN = "bench.test"
GOALS = {"ed25519": 0.9, "rsa": 0.75, "verify": 0.8, "rspamd": 0.5, "rspamd-fresh": 0.5}
ISSUE = {"ed25519": 11, "rsa": 11, "verify": 11, "rspamd": 13, "rspamd-fresh": 13}


def _message(size: int, signature: bytes = b"") -> bytes:
    """A 1 KiB-ish message in CRLF form, From: bench.test, optionally with a signature."""
    head = (
        f"From: <a@{DOMAIN}>\r\nTo: <u@{DOMAIN}>\r\nSubject: trio_mta auth bench\r\n"
        f"Date: Wed, 02 Dec 2026 00:00:00 +0000\r\nMessage-ID: <bench@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return signature + head + body


def _write_source_file(path: Path, message: bytes) -> Path:
    """smtp-source -F appends CRLF to each line: the file holds LF line ends."""
    path.write_bytes(message.replace(b"\r\n", b"\n"))
    return path


def run(a: argparse.Namespace, server: Any, workdir: Path, inbound: Any) -> int:
    """Run the comparisons a.dkim / a.verify ask for; print figures and goals.

    *inbound* is bench/inbound.py's module (its helpers: drive, say, table...).
    """
    sys.path.insert(0, str(REPO))
    from tests.dnsserver import DnsServer
    from tests.milterd import rspamd
    from trio_mta.auth.keys import generate_pem, load_key, public_value
    from trio_mta.auth.signing import Signer

    sessions = 50 if a.sessions == [1, 10, 50] else max(a.sessions)
    size = a.sizes[0] if a.sizes != [1024, 65536] else 1024
    results: list[tuple[str, float | None, float | None]] = []
    cpu_results: list[tuple[float | None, float | None]] = []
    paired_results: list[float | None] = []
    comparisons: list[str] = (
        list(dict.fromkeys(a.dkim or []))
        + (["verify"] if a.verify else [])
        + (["rspamd"] if a.rspamd else [])
        + (["rspamd-fresh"] if a.rspamd_fresh else [])
    )
    dns = DnsServer()
    dns.start()
    # The sender's SPF and DMARC records, for the runs that check them (--verify, --rspamd).
    dns.add(f"{DOMAIN}.", "TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')
    dns.add(f"_dmarc.{DOMAIN}.", "TXT", '"v=DMARC1; p=reject"')
    # An untrusted client resolving against that server (never the machine's resolver).
    untrusted = (
        "[relay]\ntrusted_networks = []\n"
        f'[dns]\nnameservers = ["{dns.address[0]}:{dns.address[1]}"]\n'
    )
    milters = contextlib.ExitStack()
    address = None
    try:
        for what in comparisons:
            if what.startswith("rspamd"):
                if address is None:
                    inbound.say("# starting a private rspamd (hyperscan, one proxy per core)")
                    address = milters.enter_context(
                        rspamd(
                            workdir / "rspamd",
                            dns.address,
                            workers=os.cpu_count() or 1,
                            hyperscan=True,
                            db_dir=Path.home() / ".cache" / "trio-mta-bench" / "rspamd",
                        )
                    )
                message = _message(size)
                reuse = "false" if what == "rspamd-fresh" else "true"
                # As an MX sees it: SPF, DKIM and DMARC are checked in both runs; the
                # milter is the only difference.
                variants = {
                    "without": untrusted,
                    "with": untrusted
                    + f'[[milter]]\naddress = "{address}"\ntimeout = "60s"\n'
                    + f"reuse_connections = {reuse}\n",
                }
            else:
                algorithm = "ed25519" if what == "verify" else what
                key_path = workdir / f"{what}.key"
                key_path.unlink(missing_ok=True)
                key_path.write_bytes(generate_pem(algorithm))  # type: ignore[arg-type]
                key = load_key(key_path, DOMAIN, f"b{what}")
                if what == "verify":
                    record = f"v=DKIM1; k=ed25519; p={public_value(key)}"
                    dns.add(f"{key.selector}._domainkey.{DOMAIN}.", "TXT", f'"{record}"')
                    plain = _message(size)
                    message = _message(size, Signer([key]).sign(plain))
                    variants = {
                        "without": untrusted
                        + "[verify]\nspf = false\ndkim = false\ndmarc = false\n",
                        "with": untrusted + "[verify]\nspf = true\ndkim = true\ndmarc = true\n",
                    }
                else:
                    message = _message(size)
                    variants = {
                        "without": "",
                        "with": (
                            f'[[dkim.sign]]\ndomain = "{DOMAIN}"\nselector = "{key.selector}"\n'
                            f'key = "{key_path}"\n'
                        ),
                    }
            source = _write_source_file(workdir / f"{what}.eml", message)
            _compare(
                a,
                server,
                workdir,
                inbound,
                what,
                sessions,
                source,
                variants,
                results,
                cpu_results,
                paired_results,
            )
    finally:
        milters.close()
        dns.stop()
    inbound.say(
        f"\nMail authentication (delivered msg/s, 1 KiB, s={sessions}, medians of {a.repeat}):"
    )
    rows = [
        [
            what,
            inbound.fmt(off, 1),
            inbound.fmt(on, 1),
            inbound.ratio(on, off),
            "-" if pair is None else f"{pair:.2f}x",
            inbound.fmt(c_off, 2),
            inbound.fmt(c_on, 2),
        ]
        for (what, off, on), (c_off, c_on), pair in zip(
            results, cpu_results, paired_results, strict=True
        )
    ]
    inbound.table(
        rows,
        [
            "feature",
            "without",
            "with",
            "with/without",
            "paired",
            "CPU ms/msg without",
            "CPU ms/msg with",
        ],
    )
    inbound.say("\nGoals (issues 11 and 13), judged from this run:")
    for (what, _off, _on), value in zip(results, paired_results, strict=True):
        want = GOALS[what]
        if value is not None:
            verdict = "met" if value >= want else "MISSED"
            inbound.say(
                f"  {verdict:6} {what}: {value:.2f}x (goal >= {want}x, issue {ISSUE[what]})"
            )
        else:
            inbound.say(f"  n/a    {what}: - (goal >= {want}x, issue {ISSUE[what]})")
    return 0


def _compare(
    a: argparse.Namespace,
    server: Any,
    workdir: Path,
    inbound: Any,
    what: str,
    sessions: int,
    source: Path,
    variants: dict[str, str],
    results: list[tuple[str, float | None, float | None]],
    cpu_results: list[tuple[float | None, float | None]],
    paired_results: list[float | None],
) -> None:
    """R interleaved repetitions of the same server without and with one feature."""
    rates: dict[str, list[float | None]] = {"without": [], "with": []}
    cpu: dict[str, list[float | None]] = {"without": [], "with": []}
    for rep in range(1, a.repeat + 1):
        # ABBA: the second run of a pair came out ~2% slower in an A/A test (both
        # variants the same), so the order alternates and neither side carries that.
        order = list(variants.items())
        for variant, extra in order if rep % 2 else order[::-1]:
            server.extra_config = extra
            target = server.start()
            try:
                cmd = [
                    "smtp-source",
                    "-s",
                    str(sessions),
                    "-m",
                    str(a.messages),
                    "-F",
                    str(source),
                    "-f",
                    inbound.SENDER,
                    "-t",
                    inbound.RCPT,
                    f"{inbound.HOST}:{target.port}",
                ]
                warm = max(20, inbound.WARMUP * sessions)
                inbound.clear_maildir(target.maildir)
                warm_cmd = [*cmd[:4], str(warm), *cmd[5:]]
                inbound.drive(warm_cmd, target, warm, min(a.timeout, 60), workdir / "warmup.out")
                inbound.clear_maildir(target.maildir)
                pids = inbound.process_tree(target.pid) if target.pid else []
                cpu0 = inbound.tree_cpu(pids) if pids else None
                rc, _client_s, delivered_s, seen, output = inbound.drive(
                    cmd, target, a.messages, a.timeout, workdir / "client.out"
                )
                cpu1 = inbound.tree_cpu(pids) if pids else None
                rate = a.messages / delivered_s if delivered_s and rc == 0 else None
                rates[variant].append(rate)
                per_msg = (
                    (cpu1 - cpu0) / a.messages * 1000
                    if cpu0 is not None and cpu1 is not None
                    else None
                )
                cpu[variant].append(per_msg)
                problem = (
                    f" ERROR rc={rc} seen={seen} {output.strip()[:200]}"
                    if (rate is None or output.strip())
                    else ""
                )
                inbound.say(
                    f"[auth {what} {variant} s={sessions} rep {rep}] "
                    f"{' '.join(cmd)}\n    -> delivered "
                    f"{inbound.fmt(rate, 1)} msg/s, server CPU "
                    f"{inbound.fmt(per_msg, 2)} ms/msg{problem}"
                )
                if variant == "with":
                    _show_sample(inbound, target.maildir, what)
            finally:
                server.stop()
                server.extra_config = ""
    paired = [
        on / off for off, on in zip(rates["without"], rates["with"], strict=True) if off and on
    ]
    results.append((what, _median(rates["without"]), _median(rates["with"])))
    paired_results.append(_median(paired))
    cpu_results.append((_median(cpu["without"]), _median(cpu["with"])))


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _show_sample(inbound: Any, maildir: Path, what: str) -> None:
    """Prove the feature ran: the first delivered file's signature or A-R line."""
    files = sorted((maildir / "new").iterdir()) if (maildir / "new").is_dir() else []
    if not files:
        return
    head = files[0].read_bytes().split(b"\n\n", 1)[0].decode(errors="replace")
    wanted = {
        "verify": "Authentication-Results",
        "rspamd": "X-Spamd-Result",
        "rspamd-fresh": "X-Spamd-Result",
    }.get(what, "DKIM-Signature")
    lines = head.split("\n")
    for index, line in enumerate(lines):
        if line.startswith(wanted):
            text = " ".join(x.strip() for x in lines[index : index + 4])
            inbound.say(f"    sample: {text[:160]}")
            return
    inbound.say(f"    sample: NO {wanted} in {files[0].name}")
