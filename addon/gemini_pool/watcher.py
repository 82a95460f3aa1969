"""Notice that the key file changed, and reload it only once it has settled.

An editor or a deploy tool writes a file in several steps: the first change the watcher sees may
be a half-written file that parses with fewer keys. So a change is reported only when the file
has looked the same for `settle` seconds. Pure logic: it stats a path; time is passed in.
"""

from __future__ import annotations

from pathlib import Path

Signature = tuple[float, int, int] | None  # (mtime, size, inode); None: no such file
_NOTHING = (-1.0, -1, -1)  # no change pending (distinct from None, a file that is gone)


def file_signature(path: str) -> Signature:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_mtime, st.st_size, st.st_ino)


class FileWatcher:
    def __init__(self, path: str = "", settle: float = 0.5) -> None:
        self.settle = settle
        self.path = path
        self.seen: Signature = file_signature(path) if path else None
        self._pending: Signature = _NOTHING
        self._pending_since = 0.0

    def reset(self, path: str) -> None:
        """The file at `path` was just loaded: its current state is the one in use."""
        self.path = path
        self.seen = file_signature(path)
        self._pending = _NOTHING

    def poll(self, now: float) -> bool:
        """True when the file changed and has not changed again for `settle` seconds."""
        sig = file_signature(self.path)
        if sig == self.seen:
            self._pending = _NOTHING
            return False
        if sig != self._pending:
            self._pending, self._pending_since = sig, now
            return False
        if now - self._pending_since < self.settle:
            return False
        self.seen, self._pending = sig, _NOTHING
        return True
