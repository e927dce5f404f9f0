"""Helpers to look into Maildirs the way a mail reader would."""

from __future__ import annotations

from pathlib import Path

import trio


def new_files(root: Path, mailbox: str) -> list[Path]:
    folder = root / mailbox / "new"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def tmp_files(root: Path) -> list[Path]:
    return [p for p in root.glob("*/tmp/*")]


async def wait_for_mail(
    root: Path, mailbox: str, count: int = 1, timeout: float = 10
) -> list[Path]:
    """Wait until ``count`` files sit in ``mailbox``'s new/ (delivery is asynchronous)."""
    with trio.move_on_after(timeout):
        while len(new_files(root, mailbox)) < count:
            await trio.sleep(0.02)
    files = new_files(root, mailbox)
    assert len(files) >= count, f"{mailbox}: {len(files)} of {count} messages after {timeout}s"
    return files
