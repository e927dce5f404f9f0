"""trio_mta.routing.router: local vs remote, maps, aliases, postmaster, relay rules, safe names."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mta.config import Config, LocalConfig, RelayConfig
from trio_mta.routing.mailmap import AliasExpansionError, expand_aliases
from trio_mta.routing.router import (
    LocalTarget,
    RcptVerdict,
    RemoteTarget,
    Router,
    safe_mailbox_name,
)
from trio_mta.smtp.replies import Reply

UNTRUSTED = "203.0.113.9"


def router(**local: Any) -> Router:
    """A router built the way the server builds one: from a checked config."""
    data: dict[str, Any] = {"local": {"domains": ["example.org", "example.net"], **local}}
    config = Config.from_mapping(data, base_dir=Path("/srv"))
    return Router(config.local, config.relay)


def rcpt(r: Router, address: str, *, ip: str = UNTRUSTED, auth: bool = False) -> RcptVerdict:
    return r.check_recipient(address, client_ip=ip, authenticated=auth)


def local(address: str, mailbox: str) -> LocalTarget:
    return LocalTarget(address, mailbox)


def remote(address: str) -> RemoteTarget:
    return RemoteTarget(address, address.rpartition("@")[2])


OK = Reply(250, "2.1.5", ("Ok",))


# -- catch-all (no mailbox map) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@example.org", local("alice@example.org", "alice")),
        ("Alice.Smith@EXAMPLE.org", local("alice.smith@example.org", "alice.smith")),
        ("bob@example.net", local("bob@example.net", "bob")),
        ('"john doe"@example.org', local('"john doe"@example.org', "john doe")),
        ("a..b@example.org", local("a..b@example.org", "a..b")),
    ],
)
def test_catch_all_every_local_part_is_a_mailbox(address: str, expected: LocalTarget) -> None:
    verdict = rcpt(router(), address)
    assert verdict == RcptVerdict(True, OK, (expected,))


def test_local_domains_match_case_insensitively() -> None:
    r = router()
    assert r.is_local_domain("EXAMPLE.org") and r.is_local_domain("example.net")
    assert not r.is_local_domain("example.com")
    assert not r.is_local_domain("sub.example.org")


# -- mailbox map ------------------------------------------------------------------------------


def mapped() -> Router:
    return router(
        mailboxes={
            "alice@example.org": "alice",
            "alice@example.net": "alice",
            "b@example.org": "Bob",
        },
        aliases={"sales@example.org": ["b@example.org"]},
    )


def test_mapped_address_goes_to_its_mailbox() -> None:
    verdict = rcpt(mapped(), "B@Example.ORG")
    assert verdict == RcptVerdict(True, OK, (local("b@example.org", "Bob"),))


def test_unmapped_local_address_is_unknown() -> None:
    verdict = rcpt(mapped(), "carol@example.org", ip="127.0.0.1", auth=True)
    assert verdict == RcptVerdict(
        False,
        Reply(550, "5.1.1", ("<carol@example.org>: Recipient address rejected: User unknown",)),
        (),
    )


def test_alias_key_is_deliverable_without_a_mapping() -> None:
    assert rcpt(mapped(), "sales@example.org").targets == (local("b@example.org", "Bob"),)


# -- aliases ----------------------------------------------------------------------------------


def test_aliases_expand_recursively() -> None:
    r = router(
        aliases={
            "all@example.org": ["team@example.org", "boss@example.org"],
            "team@example.org": ["ann@example.org", "ben@example.org"],
        }
    )
    assert rcpt(r, "all@example.org").targets == (
        local("ann@example.org", "ann"),
        local("ben@example.org", "ben"),
        local("boss@example.org", "boss"),
    )


def test_alias_listing_itself_keeps_a_copy() -> None:
    r = router(aliases={"ann@example.org": ["ann@example.org", "ann.backup@example.org"]})
    assert rcpt(r, "ann@example.org").targets == (
        local("ann@example.org", "ann"),
        local("ann.backup@example.org", "ann.backup"),
    )


def test_alias_loop_stops_at_the_repeated_address() -> None:
    # a -> b -> a: the loop stops at a (already on the path), which is a mailbox: one copy
    # there, and b (an alias, not repeated) gets none.
    r = router(aliases={"a@example.org": ["b@example.org"], "b@example.org": ["a@example.org"]})
    assert rcpt(r, "a@example.org").targets == (local("a@example.org", "a"),)
    assert rcpt(r, "b@example.org").targets == (local("b@example.org", "b"),)


def test_loop_member_without_mailbox_is_dropped() -> None:
    # Hand-made config (the loader refuses aliases that deliver nowhere): c loops back to
    # c, which has no mailbox in the map, so it is dropped; d is delivered.
    local_config = LocalConfig(
        domains=("example.org",),
        maildir_root=Path("/srv/mail"),
        mailboxes={"d@example.org": "d"},
        aliases={"c@example.org": ("c@example.org", "d@example.org")},
    )
    r = Router(local_config, RelayConfig())
    assert rcpt(r, "c@example.org").targets == (local("d@example.org", "d"),)


def test_pure_loop_in_a_hand_made_config_is_refused_not_hung() -> None:
    local_config = LocalConfig(
        domains=("example.org",),
        maildir_root=Path("/srv/mail"),
        mailboxes={},
        aliases={"x@example.org": ("y@example.org",), "y@example.org": ("x@example.org",)},
    )
    verdict = rcpt(Router(local_config, RelayConfig()), "x@example.org")
    assert not verdict.accepted and verdict.targets == ()
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.4.6")


def test_each_final_target_gets_one_copy() -> None:
    r = router(
        mailboxes={"ann@example.org": "ann", "ann@example.net": "ann", "bo@example.org": "bo"},
        aliases={
            "list@example.org": [
                "ann@example.org",
                "ANN@example.org",
                "ann@example.net",  # another address, same mailbox
                "sub@example.org",
                "x@remote.example",
                "X@Remote.Example",
            ],
            "sub@example.org": ["bo@example.org", "ann@example.org", "x@remote.example"],
        },
    )
    assert rcpt(r, "list@example.org").targets == (
        local("ann@example.org", "ann"),
        local("bo@example.org", "bo"),
        remote("x@remote.example"),
    )


def test_local_alias_to_remote_needs_no_relay_permission() -> None:
    r = router(aliases={"fwd@example.org": ["Someone@Elsewhere.EXAMPLE", "me@example.org"]})
    verdict = rcpt(r, "fwd@example.org", ip=UNTRUSTED, auth=False)
    assert verdict == RcptVerdict(
        True,
        OK,
        (
            RemoteTarget("Someone@elsewhere.example", "elsewhere.example"),
            local("me@example.org", "me"),
        ),
    )


def test_expand() -> None:
    r = router(mailboxes={"a@example.org": "a"}, aliases={"l@example.org": ["a@example.org"]})
    assert r.expand("L@example.org") == (local("a@example.org", "a"),)
    assert r.expand("a@example.org") == (local("a@example.org", "a"),)
    assert r.expand("nobody@example.org") == ()
    assert r.expand("Far@Remote.Example") == (RemoteTarget("Far@remote.example", "remote.example"),)
    assert r.expand("postmaster") == (local("postmaster@example.org", "postmaster"),)


def test_expand_aliases_limits_work_and_depth() -> None:
    chain = {f"a{i}@x": (f"a{i + 1}@x",) for i in range(200)}
    with pytest.raises(AliasExpansionError, match="nest more than 100"):
        expand_aliases("a0@x", chain)
    assert expand_aliases("a150@x", chain) == ("a200@x",)
    # 30 levels of diamonds: 2**30 simple paths; the step budget ends it quickly
    diamonds: dict[str, tuple[str, ...]] = {f"n{i}@x": (f"l{i}@x", f"r{i}@x") for i in range(30)}
    diamonds |= {f"l{i}@x": (f"n{i + 1}@x",) for i in range(30)}
    diamonds |= {f"r{i}@x": (f"n{i + 1}@x",) for i in range(30)}
    with pytest.raises(AliasExpansionError, match="more than 10000 steps"):
        expand_aliases("n0@x", diamonds)
    assert expand_aliases("n25@x", diamonds) == ("n30@x",)


# -- postmaster (RFC 5321 §4.5.1) -------------------------------------------------------------


@pytest.mark.parametrize("address", ["postmaster", "PostMaster", "postmaster@example.org"])
def test_postmaster_is_always_accepted(address: str) -> None:
    r = router(mailboxes={"alice@example.org": "alice"})  # a map without postmaster
    verdict = rcpt(r, address, ip=UNTRUSTED)
    assert verdict == RcptVerdict(True, OK, (local("postmaster@example.org", "postmaster"),))


def test_postmaster_of_every_local_domain() -> None:
    verdict = rcpt(router(mailboxes={}), "Postmaster@Example.NET")
    assert verdict.targets == (local("postmaster@example.net", "postmaster"),)


def test_postmaster_follows_its_alias_and_mapping() -> None:
    r = router(
        mailboxes={"alice@example.org": "alice", "postmaster@example.net": "pm"},
        aliases={"postmaster@example.org": ["alice@example.org"]},
    )
    assert rcpt(r, "postmaster").targets == (local("alice@example.org", "alice"),)
    assert rcpt(r, "postmaster@example.net").targets == (local("postmaster@example.net", "pm"),)


# -- trusted networks and relay ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [
        ("127.0.0.1", True),
        ("127.255.0.7", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # dual-stack socket, IPv4 peer
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),
        ("2001:db8:0:1::5", True),
        ("2001:db8:0:2::5", False),
        ("11.0.0.1", False),
        ("::ffff:11.0.0.1", False),
        ("::2", False),
        ("", False),
        ("not-an-ip", False),
        ("fe80::1%eth0", False),
    ],
)
def test_is_trusted(ip: str, trusted: bool) -> None:
    relay = RelayConfig(
        trusted_networks=(
            ip_network("127.0.0.0/8"),
            ip_network("::1/128"),
            ip_network("10.0.0.0/8"),
            ip_network("2001:db8:0:1::/64"),
        )
    )
    r = Router(LocalConfig(("example.org",), Path("/srv/mail")), relay)
    assert r.is_trusted(ip) is trusted


def test_default_trusted_networks_are_loopback() -> None:
    r = router()
    assert r.is_trusted("127.0.0.1") and r.is_trusted("::1") and r.is_trusted("::ffff:127.0.0.2")
    assert not r.is_trusted("192.168.1.1")


def test_relay_denied_for_untrusted_unauthenticated_client() -> None:
    verdict = rcpt(router(), "someone@remote.example", ip=UNTRUSTED)
    assert verdict == RcptVerdict(
        False, Reply(554, "5.7.1", ("<someone@remote.example>: Relay access denied",)), ()
    )


@pytest.mark.parametrize(
    ("ip", "auth"), [("127.0.0.1", False), ("::ffff:127.0.0.1", False), (UNTRUSTED, True)]
)
def test_relay_allowed_for_trusted_or_authenticated(ip: str, auth: bool) -> None:
    verdict = rcpt(router(), "Some.One@Remote.EXAMPLE", ip=ip, auth=auth)
    assert verdict == RcptVerdict(
        True, OK, (RemoteTarget("Some.One@remote.example", "remote.example"),)
    )


def test_mode_can_forbid_relay_even_when_authenticated() -> None:
    r = router()
    verdict = r.check_recipient(
        "x@remote.example", client_ip="127.0.0.1", authenticated=True, relay_allowed_for_mode=False
    )
    assert (verdict.accepted, verdict.reply.code, verdict.reply.status) == (False, 554, "5.7.1")
    local_verdict = r.check_recipient(
        "x@example.org", client_ip=UNTRUSTED, authenticated=False, relay_allowed_for_mode=False
    )
    assert local_verdict.accepted


def test_address_literal_domain_is_remote() -> None:
    assert not rcpt(router(), "x@[192.0.2.1]").accepted
    assert rcpt(router(), "x@[192.0.2.1]", auth=True).targets == (
        RemoteTarget("x@[192.0.2.1]", "[192.0.2.1]"),
    )


@pytest.mark.parametrize("address", ["", "nodomain", "@example.org", "x@"])
def test_malformed_address(address: str) -> None:
    verdict = rcpt(router(), address, ip="127.0.0.1", auth=True)
    assert not verdict.accepted
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.1.3")
    assert verdict.reply.lines == (f"<{address}>: Bad recipient address syntax",)


# -- mailbox names can never be paths ---------------------------------------------------------

TRAVERSAL_LOCAL_PARTS = [
    '"../x"',
    '"a/b"',
    "%2e%2e",
    "a%2fb",
    '"a\\\\b"',  # quoted-pair: the local part is a\b
    '"a\x00b"',
    '"a\tb"',
    '"a\x1bb"',
    '"."',
    '".."',
    ".hidden",
    '".hidden"',
]


@pytest.mark.parametrize("local_part", TRAVERSAL_LOCAL_PARTS)
def test_catch_all_rejects_unsafe_names_at_rcpt(local_part: str) -> None:
    verdict = rcpt(router(), f"{local_part}@example.org", ip="127.0.0.1", auth=True)
    assert not verdict.accepted and verdict.targets == ()
    text = verdict.reply.text
    if any(ord(c) < 32 for c in local_part):
        # Control characters are refused as address syntax before any mailbox lookup.
        assert (verdict.reply.code, verdict.reply.status) == (553, "5.1.3")
        assert text.startswith("Bad recipient address syntax: U+00")
    else:
        assert (verdict.reply.code, verdict.reply.status) == (550, "5.1.3")
        assert text.endswith(">: Recipient address rejected: bad mailbox")
    assert not any(ord(c) < 32 for c in text)  # echoed address cannot inject reply lines


@pytest.mark.parametrize("local_part", ['"a\x85b"', '"a\u2028b"', "a\x9bb", '"a\x7fb"'])
def test_recipient_with_control_characters_is_refused_as_syntax(local_part: str) -> None:
    for domain in ("example.org", "far.test"):  # local and relayed alike
        verdict = rcpt(router(), f"{local_part}@{domain}", ip="127.0.0.1", auth=True)
        assert not verdict.accepted and verdict.targets == ()
        assert (verdict.reply.code, verdict.reply.status) == (553, "5.1.3")
        assert verdict.reply.text.endswith("not allowed in an address")


def test_hand_made_unsafe_mapping_is_refused_too() -> None:
    local_config = LocalConfig(
        ("example.org",), Path("/srv/mail"), mailboxes={"a@example.org": "../../etc"}
    )
    verdict = rcpt(Router(local_config, RelayConfig()), "a@example.org")
    assert (verdict.accepted, verdict.reply.status) == (False, "5.1.3")


@pytest.mark.parametrize(
    "name", ["alice", "Alice", "john doe", "a.b", "a..b", "a-b_c+d", "ü", "x" * 255, "é" * 127]
)
def test_safe_mailbox_name_accepts(name: str) -> None:
    assert safe_mailbox_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        ".hidden",
        "../x",
        "a/b",
        "/abs",
        "a\\b",
        "..\\x",
        "%2e%2e",
        "%2f",
        "a%20b",
        "a\x00b",
        "a\nb",
        "a\rb",
        "\x7f",
        "a\u0085b",  # NEL (category Cc)
        "a\u200bb",  # zero-width space (Cf)
        "a\u2028b",  # line separator
        "a\ud800b",  # lone surrogate
        "x" * 256,
        "é" * 128,  # 256 octets in UTF-8
    ],
)
def test_safe_mailbox_name_rejects(name: str) -> None:
    with pytest.raises(ValueError):
        safe_mailbox_name(name)


ROOT = Path("/srv/trio-mta-test-root/mail")
PATHISH = st.text(alphabet="./\\%2efa\x00\n ~:", max_size=8)


@given(st.one_of(st.text(), PATHISH, st.text(st.characters(codec=None), max_size=20)))
def test_safe_names_stay_directly_inside_the_root(name: str) -> None:
    try:
        checked = safe_mailbox_name(name)
    except ValueError:
        return
    assert checked == name
    assert Path(ROOT, checked).resolve().parent == ROOT.resolve()


def test_safe_names_inside_a_real_root(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    for name in ["a", "a..", "~", "-", " x", "x ", "a.b."]:
        target = Path(root, safe_mailbox_name(name))
        target.mkdir()
        assert target.resolve().parent == root.resolve()
