"""The pytest plugin, tested the way pytest plugins are: ``pytester`` runs small user
test files (synchronous and trio) that use each fixture, and checks their outcomes.

Entry-point loading is switched off in these runs and the plugins are named with
``-p``, so the result is the same whether or not the installed trio_mta already
registers the ``pytest11`` entry point (it would otherwise be loaded twice).
"""

from __future__ import annotations

import importlib.metadata
import textwrap
import tomllib
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
WITH_TRIO = ("-p", "trio_mta.testing.plugin", "-p", "pytest_trio.plugin")


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=textwrap.dedent(source))
    return pytester.runpytest_subprocess(*WITH_TRIO, "-p", "no:cacheprovider", *args, timeout=120)


def test_sync_user_test_sends_with_smtplib_and_asserts(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import smtplib

        def test_welcome_mail(smtp_capture):
            with smtplib.SMTP(smtp_capture.host, smtp_capture.port) as client:
                client.starttls(context=smtp_capture.ssl_context)
                client.sendmail("app@example.test", ["new@example.test"],
                                b"Subject: Welcome\\r\\n\\r\\nHello\\r\\n")
            (msg,) = smtp_capture.wait_for(1)
            assert msg.recipients == ["new@example.test"]
            assert msg.message["Subject"] == "Welcome"
            assert msg.tls is not None
    """,
    )
    result.assert_outcomes(passed=1)


def test_trio_user_test_uses_the_trio_capture(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import pytest
        import trio_mta

        @pytest.mark.trio
        async def test_notification(trio_mta_capture):
            await trio_mta.send_message(
                b"Subject: ping\\r\\n\\r\\n.dot\\r\\n", sender="a@example.test",
                recipients=["b@example.test"], host=trio_mta_capture.host,
                port=trio_mta_capture.port, tls="none")
            (msg,) = await trio_mta_capture.wait_for(1)
            assert msg.data == b"Subject: ping\\r\\n\\r\\n.dot\\r\\n"
    """,
    )
    result.assert_outcomes(passed=1)


def test_fake_dns_user_test(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import pytest
        from trio_mta.config import Config
        from trio_mta.dns import Resolver

        @pytest.mark.trio
        async def test_mx(fake_dns, tmp_path):
            fake_dns.add("example.test", "MX", "10 mx.example.test.")
            fake_dns.add("mx.example.test", "A", "127.0.0.1")
            config = Config.from_mapping({"dns": {"nameservers": [fake_dns.nameserver]}},
                                         base_dir=tmp_path)
            hosts = await Resolver(config.dns.nameservers).mail_hosts("example.test")
            assert [h.name for h in hosts] == ["mx.example.test"]

        def test_unknown_is_nxdomain(fake_dns):
            import dns.message, dns.query, dns.rcode
            query = dns.message.make_query("nothere.test", "MX")
            host, port = fake_dns.address
            assert dns.query.udp(query, host, port=port, timeout=5).rcode() == dns.rcode.NXDOMAIN
    """,
    )
    result.assert_outcomes(passed=2)


def test_a_failing_user_assertion_fails(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import smtplib

        def test_wrong_subject(smtp_capture):
            with smtplib.SMTP(smtp_capture.host, smtp_capture.port) as client:
                client.sendmail("a@example.test", ["b@example.test"], b"Subject: Hi\\r\\n\\r\\n")
            (msg,) = smtp_capture.wait_for(1)
            assert msg.message["Subject"] == "Bye"
    """,
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError*", "*'Hi' == 'Bye'*"])


def test_a_test_that_sends_nothing_fails_in_wait_for_clearly(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import pytest

        def test_forgot_to_send(smtp_capture):
            smtp_capture.wait_for(1, timeout=0.2)

        @pytest.mark.trio
        async def test_forgot_to_send_trio(trio_mta_capture):
            await trio_mta_capture.wait_for(2, timeout=0.2)
    """,
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*MessagesNotReceived: expected 1 message at 127.0.0.1:*, none arrived within 0.2 s*",
            "*MessagesNotReceived: expected 2 messages at 127.0.0.1:*, none arrived within 0.2 s*",
        ]
    )


def test_fixtures_leave_nothing_running(pytester: pytest.Pytester) -> None:
    """After each test the capture's thread and folders are gone and the port is closed."""
    result = run(
        pytester,
        """
        import socket, threading, pytest

        seen = {}

        def worker_threads():
            return {t for t in threading.enumerate() if t.name.startswith("Trio thread")}

        def test_one(smtp_capture, fake_dns):
            seen["threads"] = set(threading.enumerate())
            seen["address"] = (smtp_capture.host, smtp_capture.port)
            seen["folder"] = smtp_capture.cafile.parent
            seen["dns"] = fake_dns.address

        def test_after():
            assert {t.name for t in threading.enumerate()
                    if t.name.startswith(("SMTPCapture", "FakeDNS"))} == set()
            assert not seen["folder"].exists()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(seen["address"], timeout=5)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(seen["dns"], timeout=5)

        @pytest.mark.trio
        async def test_trio_one(trio_mta_capture):
            seen["trio_folder"] = trio_mta_capture.cafile.parent
            seen["trio_address"] = (trio_mta_capture.host, trio_mta_capture.port)

        def test_trio_after():
            assert not seen["trio_folder"].exists()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(seen["trio_address"], timeout=5)
    """,
    )
    result.assert_outcomes(passed=4)


def test_a_suite_without_the_fixtures_does_not_import_trio(pytester: pytest.Pytester) -> None:
    """The plugin loads in every suite of a project with trio_mta installed: it must cost
    nothing there (no trio, dnspython, hypothesis or the server imported)."""
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_nothing_heavy_loaded():
            heavy = {"trio", "dns", "hypothesis", "trio_mta.mta", "trio_mta.testing.capture"}
            assert sorted(heavy & set(sys.modules)) == []
    """
    )
    result = pytester.runpytest_subprocess(
        "-p", "trio_mta.testing.plugin", "-p", "no:cacheprovider", timeout=120
    )
    result.assert_outcomes(passed=1)


def test_trio_fixture_without_pytest_trio_says_what_is_missing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        async def test_needs_trio(trio_mta_capture):
            pass
    """
    )
    result = pytester.runpytest_subprocess(
        "-p", "trio_mta.testing.plugin", "-p", "no:cacheprovider", timeout=120
    )
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*pytest-trio*"])


def test_entry_point_names_the_plugin_module(pytester: pytest.Pytester) -> None:
    """pyproject declares ``pytest11: trio_mta``, and that module offers the three fixtures."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (module,) = project["project"]["entry-points"]["pytest11"].values()
    assert project["project"]["entry-points"]["pytest11"] == {"trio_mta": module}
    result = pytester.runpytest_subprocess(
        "-p", module, "-p", "pytest_trio.plugin", "--fixtures", timeout=120
    )
    result.stdout.fnmatch_lines_random(["smtp_capture*", "trio_mta_capture*", "fake_dns*"])


def test_installed_metadata_registers_the_plugin() -> None:
    """Once trio_mta is (re)installed, pytest finds the plugin by entry point."""
    found = [
        ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "trio_mta"
    ]
    if not found:
        pytest.skip("the installed trio_mta predates the entry point: pip install -e . again")
    assert found[0].value == "trio_mta.testing.plugin"
