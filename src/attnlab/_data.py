"""Where the shared data files are found (library-level: the probes and the tasks both read them).

tinyshakespeare (Karpathy's char-rnn corpus), first hit wins:
    1. the `path=` argument
    2. the ATTNLAB_TINYSHAKESPEARE environment variable
    3. ../shared/data/tinyshakespeare/input.txt from the current directory, then from the repo root
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ATTNLAB_TINYSHAKESPEARE"
DEFAULT_RELATIVE = Path("..") / "shared" / "data" / "tinyshakespeare" / "input.txt"
REPO_ROOT = Path(__file__).resolve().parents[2]          # src/attnlab/_data.py -> repo


def find_corpus(path: str | os.PathLike | None = None) -> Path:
    """The tiny-shakespeare file to read, or a FileNotFoundError saying where to put it."""
    if path is not None:
        candidate = Path(path).expanduser()
        if not candidate.is_file():
            raise FileNotFoundError(f"tinyshakespeare: path={str(path)!r} is not a file")
        return candidate
    if os.environ.get(ENV_VAR):
        candidate = Path(os.environ[ENV_VAR]).expanduser()
        if not candidate.is_file():
            raise FileNotFoundError(f"tinyshakespeare: {ENV_VAR}={str(candidate)!r} is not a file")
        return candidate
    tried = [Path.cwd() / DEFAULT_RELATIVE, REPO_ROOT / DEFAULT_RELATIVE]
    for candidate in tried:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        "tinyshakespeare: input.txt not found (looked at "
        + ", ".join(str(c.resolve()) for c in tried)
        + f"). Put the corpus at {(REPO_ROOT / DEFAULT_RELATIVE).resolve()}, set {ENV_VAR}=/path/to/input.txt, "
        "or pass the task option path=...")
