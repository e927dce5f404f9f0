"""Checks that look past one key's value: the filesystem, or several keys together.

Loading a file must not depend on the machine it is loaded on (``queue list`` runs as another
user than the server), so these run only where they matter: ``check-config`` and ``serve``.
"""

from __future__ import annotations

import os
import stat
from ipaddress import ip_address
from pathlib import Path

from trio_mta.config.loader import Config

__all__ = ["open_relay_warning", "writable_file_problem"]


def writable_file_problem(path: Path) -> str | None:
    """Why *path* cannot be opened for appending, missing folders created, or None if it can.

    Nothing is created: ``check-config`` must not leave files behind. ``os.access`` is used
    rather than the mode bits, so root's override and read-only mounts count as the kernel
    counts them.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return _creatable_problem(path)
    except OSError as exc:
        return f"cannot use {path}: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a directory, not a file"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable ({_why_not_writable(path)})"
    return None


def _creatable_problem(path: Path) -> str | None:
    """*path* does not exist: its nearest existing ancestor must be a folder we may write."""
    ancestor = path.parent
    while True:
        try:
            st = os.stat(ancestor)
        except (FileNotFoundError, NotADirectoryError):
            if ancestor.parent == ancestor:
                return f"cannot create {path}"
            ancestor = ancestor.parent
            continue
        except OSError as exc:
            return f"cannot create {path}: {ancestor}: {exc.strerror or exc}"
        break
    if not stat.S_ISDIR(st.st_mode):
        return f"cannot create {path}: {ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create {path}: {ancestor} is not writable ({_why_not_writable(ancestor)})"
    return None


def _why_not_writable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def _is_loopback(host: str) -> bool:
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def open_relay_warning(config: Config) -> str | None:
    """A warning when anyone on the Internet may relay: a trusted network with prefix length 0
    (``0.0.0.0/0``, ``::/0``) while a listener is reachable from outside loopback."""
    everyone = [str(net) for net in config.relay.trusted_networks if net.prefixlen == 0]
    exposed = [listener.address for listener in config.listen if not _is_loopback(listener.host)]
    if not everyone or not exposed:
        return None
    return (
        f"[relay].trusted_networks: {', '.join(everyone)} lets every Internet host relay "
        f"through {', '.join(exposed)} (an open relay); list only your own networks"
    )
