"""A signed message relayed to a real Postfix still verifies in what Postfix stored.

trio_mta signs the submission (RSA and Ed25519), relays it over SMTP to a private
Postfix (tests/postfix_instance.py), and OpenDKIM checks the file Postfix's
virtual(8) wrote: whatever Postfix added or rewrote in transit, both signatures
must survive.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from trio_mta.config import Config
from trio_mta.mta import MTA, serve

from .authhelpers import OPENDKIM, make_key, opendkim_verify
from .postfix_instance import PostfixInstance
from .test_dkim import signature_fields
from .test_postfix_interop import (  # noqa: F401 (fixtures)
    SKIP_REASON,
    pf_dns,
    postfix,
    submit,
    trio_port,
    wait_for_postfix_mail,
)

pytestmark = [
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
    pytest.mark.skipif(OPENDKIM is None, reason="opendkim is not installed"),
]


async def test_signatures_survive_relay_through_postfix(
    nursery: trio.Nursery,
    make_config: Callable[..., Config],
    postfix: PostfixInstance,  # noqa: F811
    pf_dns: None,  # noqa: F811
    tmp_path: Path,
) -> None:
    rsa = make_key(tmp_path, "trio.test", "r1", "rsa")
    ed = make_key(tmp_path, "trio.test", "e1", "ed25519")
    config = make_config(
        local={"domains": ["trio.test"]},
        relay={"port": postfix.port},
        dkim={
            "sign": [
                {"domain": "trio.test", "selector": "r1", "key": str(rsa.key.path)},
                {"domain": "trio.test", "selector": "e1", "key": str(ed.key.path)},
            ]
        },
    )
    mta: MTA = await nursery.start(serve, config)
    message = (
        b"From: Alice <alice@trio.test>\r\nTo: someone@pf.test\r\n"
        b"Subject: signed, via Postfix\r\n\r\nHello Postfix.\r\n.leading dot\r\n"
        b"trailing space \r\n\r\n"
    )
    await trio.to_thread.run_sync(
        submit, mta.address("smtp")[1], "alice@trio.test", "someone@pf.test", message
    )
    stored = (await wait_for_postfix_mail(postfix, "someone")).read_bytes()
    assert b"(Postfix)" in stored and stored.count(b"DKIM-Signature:") == 2
    crlf = stored.replace(b"\n", b"\r\n")
    fields = signature_fields(crlf)
    for index, pair in enumerate([rsa, ed]):
        only = crlf
        for other, field in enumerate(fields):
            if other != index:
                only = only.replace(field, b"")
        [verdict] = opendkim_verify(only, [pair], tmp_path / pair.key.selector)
        assert "succeeded" in verdict, verdict
