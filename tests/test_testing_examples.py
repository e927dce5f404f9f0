"""examples/app_tests (docs/testing.md's example suite) passes, and fails when its app breaks.

The suite runs as its users run it, ``python -m pytest`` in its folder (a copy,
so no cache or hypothesis database lands in the checkout), with the trio_mta
plugin and pytest-trio named explicitly: entry-point loading is off so the run
does not depend on whether the installed trio_mta already declares the plugin.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

APP_TESTS = Path(__file__).resolve().parent.parent / "examples" / "app_tests"


def run_suite(folder: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "trio_mta.testing.plugin",
            "-p",
            "pytest_trio.plugin",
            "-rf",
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_example_suite_passes(tmp_path: Path) -> None:
    shutil.copytree(APP_TESTS, tmp_path / "app")
    result = run_suite(tmp_path / "app")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b5 passed\b", result.stdout), result.stdout


def test_example_suite_catches_a_broken_app(tmp_path: Path) -> None:
    """A wrong subject and a lost recipient domain: the example's tests must notice."""
    shutil.copytree(APP_TESTS, tmp_path / "app")
    shop = tmp_path / "app" / "shop.py"
    source = shop.read_text()
    broken = source.replace('f"Your order #{order_id}"', 'f"Order {order_id}"').replace(
        '"ALERT: " + text', '"Alert: " + text'
    )
    assert broken != source
    shop.write_text(broken)
    result = run_suite(tmp_path / "app")
    assert result.returncode == 1
    failed = set(re.findall(r"^FAILED test_shop\.py::(\w+)", result.stdout, re.MULTILINE))
    assert failed == {"test_receipt_is_sent_to_the_customer", "test_alert_from_a_trio_service"}
