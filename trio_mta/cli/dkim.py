"""``trio-mta dkim keygen DOMAIN SELECTOR``: a new DKIM key and the DNS record to publish.

The key file is created mode 0600 and never overwritten (an existing key may be the
one DNS publishes); the TXT record goes to stdout ready to paste into a zone file,
the ``[[dkim.sign]]`` entry to stderr as a hint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from trio_mta.cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from trio_mta.config import schema

__all__ = ["add_parser", "run_dkim_command"]


def add_parser(
    sub: argparse._SubParsersAction[Any], parser_class: type[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """``dkim keygen`` under *sub*; *parser_class* is the caller's (errors exit 2)."""
    dkim: argparse.ArgumentParser = sub.add_parser("dkim", help="DKIM signing keys")
    dsub = dkim.add_subparsers(dest="dkim_command", parser_class=parser_class, required=True)
    keygen = dsub.add_parser("keygen", help="write a new private key, print its TXT record")
    keygen.add_argument("domain")
    keygen.add_argument("selector")
    keygen.add_argument(
        "--algorithm",
        choices=["rsa", "ed25519"],
        default="rsa",
        help="rsa (2048 bits, understood everywhere; the default) or ed25519 "
        "(RFC 8463, small and fast; sign with both to use it)",
    )
    keygen.add_argument(
        "--out",
        metavar="FILE",
        type=Path,
        help="where to write the key (default: DOMAIN.SELECTOR.key)",
    )
    return dkim


def run_dkim_command(args: argparse.Namespace) -> int:
    # cryptography is loaded for this command only, not for every trio-mta start.
    from trio_mta.auth.keys import DkimKeyError, generate_pem, load_key, txt_record, write_private

    domain, selector = args.domain.lower().rstrip("."), args.selector
    if not schema.is_hostname(domain):
        print(f"trio-mta dkim keygen: {args.domain!r} is not a domain name", file=sys.stderr)
        return EXIT_USAGE
    if not schema.is_hostname(selector):
        print(
            f"trio-mta dkim keygen: selector {selector!r} must be a DNS label like s2026",
            file=sys.stderr,
        )
        return EXIT_USAGE
    out: Path = args.out or Path(f"{domain}.{selector}.key")
    try:
        write_private(out, generate_pem(args.algorithm))
        key = load_key(out, domain, selector)
    except FileExistsError:
        print(f"trio-mta dkim keygen: {out} already exists; not overwriting a key", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"trio-mta dkim keygen: {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except DkimKeyError as exc:
        print(f"trio-mta dkim keygen: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(txt_record(key))
    print(
        f"wrote {key.algorithm} key to {out} (mode 0600); add to the config:\n"
        f'[[dkim.sign]]\ndomain = "{domain}"\nselector = "{selector}"\nkey = "{out}"',
        file=sys.stderr,
    )
    return EXIT_OK
