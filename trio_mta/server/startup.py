"""What a serving process prepares before it listens: state folders, descriptors, TLS.

Apart from :mod:`trio_mta.mta` so that the ``[server] workers`` supervisor can
do the same preparation (and fail on a bad TLS pair with the same one-line
error) without importing the whole MTA: it stays a small process.
"""

from __future__ import annotations

import contextlib
import resource
import ssl
from pathlib import Path

from trio_mta import privileges
from trio_mta.config import Config
from trio_mta.tls import ensure_certificate, server_context

__all__ = ["build_ssl_context", "certificate_paths", "prepare_state_dirs", "raise_nofile_limit"]


def raise_nofile_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit: every idle client holds a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def certificate_paths(config: Config) -> tuple[Path, Path]:
    """The (cert, key) to serve: the configured pair, else the generated one (made if needed)."""
    return ensure_certificate(
        config.tls.cert, config.tls.key, hostname=config.hostname, state_dir=config.state_dir
    )


def build_ssl_context(config: Config) -> ssl.SSLContext:
    return server_context(*certificate_paths(config))


def prepare_state_dirs(config: Config, identity: privileges.Identity | None) -> None:
    """``state_dir`` exists before anything is written there; owned by ``user`` when
    root is dropped (``maildir_root`` too: otherwise the Maildir agent makes it)."""
    if identity is not None:
        privileges.prepare_directories(config, identity)
    else:
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
