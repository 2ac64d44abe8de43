"""Files and text out: atomic writes, timestamped output folders, table cells, error lines."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp_path)` writes the content; it is flushed to disk, then renamed onto `path`.

    A reader sees the old file or the new one, never half of one; a crash leaves no temp file
    behind under the target's name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_figure(fig, path: Path, **savefig_options) -> Path:
    """Write a matplotlib figure to `path` atomically (format from the suffix, PNG by default)."""
    path = Path(path)
    fmt = savefig_options.pop("format", path.suffix.lstrip(".").lower() or "png")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_options))
    return path


def write_text(path: Path, text: str) -> None:
    """Atomically replace `path` with `text`."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def default_out(root: str = "bench-results") -> Path:
    """root/<timestamp>, with a -1, -2, ... suffix when that folder exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, i = Path(root) / stamp, 1
    while out.exists():
        out, i = Path(root) / f"{stamp}-{i}", i + 1
    return out


def fmt(value: float | None, spec: str) -> str:
    """A table cell: '-' for a missing value, else format(value, spec)."""
    return "-" if value is None else format(value, spec)


def describe_error(e: BaseException) -> str:
    """An exception as one line for a table or a log, at most 300 characters."""
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 300 else text[:297] + "..."
