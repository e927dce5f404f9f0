"""The README's first two commands do what they say, and .ci/run runs the README's tests."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEBIAN_PYTHON = Path("/usr/bin/python3")


def first_commands() -> list[str]:
    """The command of each line of the README's first ``sh`` block, comments dropped."""
    block = re.search(r"```sh\n(.*?)```", README, re.DOTALL)
    assert block is not None, "the README must start with an sh block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]


def test_readme_starts_with_install_and_run_then_ci() -> None:
    assert README.index("```sh") < README.index("\n## ")  # before any section
    install_and_run, ci = first_commands()
    assert install_and_run.endswith("&& .venv/bin/trio-mta")
    assert ci == ".ci/run"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    tests_line = re.search(r"- Tests: `([^`]*)`", README)
    assert tests_line is not None
    readme_pytest = tests_line.group(1).split("&&")[-1].strip()
    assert readme_pytest.startswith("python3 -m pytest")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci_lines if line and not line.startswith("#")]
    assert commands[-1] == readme_pytest


def _copy_checkout(dest: Path) -> Path:
    junk = shutil.ignore_patterns(
        ".git",
        ".venv",
        "__pycache__",
        "*.egg-info",
        "build",
        "dist",
        ".*_cache",
        ".hypothesis",
        "trio-mta-data",
        "fuzz",
    )
    shutil.copytree(ROOT, dest, ignore=junk)
    return dest


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEBIAN_PYTHON.is_file() and Path("/usr/lib/python3/dist-packages").is_dir()),
    reason="needs Debian's own /usr/bin/python3",
)
def test_readme_install_command_works_with_debians_own_python(tmp_path: Path) -> None:
    # Regression: `pip install . && trio-mta` failed with externally-managed-environment.
    probe = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import ensurepip, venv"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip("Debian's python3 lacks python3-venv (.ci/run installs it)")
    checkout = _copy_checkout(tmp_path / "checkout")
    install_and_run, _ = first_commands()
    install = install_and_run.removesuffix("&& .venv/bin/trio-mta").strip()
    # Debian's python3 and pip first on PATH, and none of this test run's environment.
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYENV_VERSION")
    }
    env["PATH"] = "/usr/bin:/bin"
    built = subprocess.run(
        ["sh", "-c", install], cwd=checkout, env=env, capture_output=True, text=True, timeout=600
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert "externally-managed-environment" not in built.stderr
    trio_mta = checkout / ".venv" / "bin" / "trio-mta"
    version = subprocess.run(
        [str(trio_mta), "--version"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert re.fullmatch(r"trio-mta \d+\.\d+\.\d+\n", version.stdout), version.stderr
    where = subprocess.run(
        [
            str(checkout / ".venv" / "bin" / "python3"),
            "-c",
            "import trio_mta, sys; print(trio_mta.__file__); print(sys.base_prefix)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    module, base = where.stdout.splitlines()
    assert module.startswith(str(checkout / ".venv")), module  # installed, not the checkout
    assert base == "/usr", shlex.quote(base)  # the venv is built on Debian's own Python
