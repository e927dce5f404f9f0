"""The layering of docs/architecture.md, checked where a check is cheap and exact."""

from __future__ import annotations

import json
import subprocess
import sys

IO_LIBRARIES = ("trio", "sqlite3", "_sqlite3", "dns", "ssl", "socket", "asyncio")


def test_importing_the_sans_io_core_loads_no_io_library() -> None:
    """``import trio_mta.smtp`` in a fresh interpreter must not pull in trio, sqlite3 or
    dnspython: the protocol core is meant to be fuzzed and reused without them."""
    probe = (
        "import sys, json; before = set(sys.modules); import trio_mta.smtp; "
        f"print(json.dumps(sorted(m for m in {IO_LIBRARIES!r} if m in sys.modules "
        "and m not in before)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_public_names_still_resolve_lazily() -> None:
    """The embedding API of SPEC §7 stays ``trio_mta.serve``, ``trio_mta.Config`` and so on."""
    import trio_mta

    for name in (
        "Config",
        "ConfigError",
        "Envelope",
        "Handler",
        "ListenError",
        "Listener",
        "MTA",
        "Reply",
        "SendResult",
        "SessionInfo",
        "send_message",
        "serve",
    ):
        assert getattr(trio_mta, name) is not None, name
    assert set(trio_mta.__all__) <= set(dir(trio_mta))


def test_smtp_sources_import_nothing_outside_the_standard_library_and_themselves() -> None:
    """No module of ``trio_mta/smtp/`` imports another trio_mta package (data flows forward)."""
    import ast
    from pathlib import Path

    import trio_mta.smtp

    root = Path(trio_mta.smtp.__file__).parent
    offenders = []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mod = node.module
            elif isinstance(node, ast.Import):
                mod = node.names[0].name
            else:
                continue
            if mod.startswith("trio_mta") and not mod.startswith("trio_mta.smtp"):
                offenders.append(f"{path.name}: {mod}")
            if mod.split(".")[0] in IO_LIBRARIES:
                offenders.append(f"{path.name}: {mod}")
    assert offenders == []


def test_importing_the_proxy_protocol_parser_loads_no_io_library() -> None:
    """``trio_mta.proxy`` is sans-IO like ``trio_mta.smtp``: fuzzable without trio."""
    probe = (
        "import sys, json; before = set(sys.modules); import trio_mta.proxy; "
        f"print(json.dumps(sorted(m for m in {IO_LIBRARIES!r} if m in sys.modules "
        "and m not in before)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
