"""Files that readers on other processes (or hosts) see whole or not at all."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a half-written one."""
    # The temporary name is this thread's own: two threads of a process may write the same file at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
