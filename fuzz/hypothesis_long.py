"""pytest plugin: the smtp property tests with many examples (hypothesis profile "fuzz").

    python -m pytest -p fuzz.hypothesis_long -q tests/test_smtp_*.py
    FUZZ_EXAMPLES=1000000 python -m pytest -p fuzz.hypothesis_long -q tests/test_smtp_server.py

A plugin rather than conftest.py: loaded with ``-p`` it runs before the test
modules are imported, so the profile is the default for every ``@given`` that
does not pin ``max_examples`` itself (none of the smtp tests do; the stateful
one takes a share of it), and the everyday suite keeps hypothesis' fast defaults.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "100000")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.load_profile("fuzz")
