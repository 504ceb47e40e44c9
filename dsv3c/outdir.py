"""Output safety: dsv3c replaces only directories it wrote (marked), and SIGTERM/SIGHUP clean up like SIGINT."""

import contextlib
import os
import re
import signal
import threading
from pathlib import Path

MARKER = ".dsv3c-output"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a compile: unwinds (and cleans up) like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _error(message: str) -> Exception:
    """The driver's OutputError with message (imported late: the driver imports torch)."""
    from dsv3c.driver import OutputError

    return OutputError(message)


def mark(directory) -> None:
    """Write the marker that says dsv3c wrote this directory (holds the version)."""
    from dsv3c import __version__

    (Path(directory) / MARKER).write_text(f"dsv3c {__version__}\n")


def is_marked(directory) -> bool:
    """Whether directory carries dsv3c's output marker."""
    return (Path(directory) / MARKER).is_file()


def safe_name(name: str, what: str) -> str:
    """name, if it can be one path component under the output root; else an OutputError naming it."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise _error(f"{what} {name!r} cannot name an output directory: use letters, digits, '.', '_', '+', '-'")
    return name


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing ancestor of path (path itself if it exists)."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path("/")


def check_replaceable(path, flag: str) -> None:
    """Refuse (OutputError) a --out/--dump-dir dsv3c may not write: cwd or its ancestors, files, foreign dirs."""
    p = Path(path)
    if str(path).strip() == "" or p.name in ("", ".", ".."):
        raise _error(f"{flag} {str(path)!r} must name a directory of its own, not '.', '..' or a root")
    absolute = p.absolute()
    resolved = p.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise _error(f"{flag} {path} is the current directory or one of its parents; name a new directory")
    if p.is_symlink():
        raise _error(f"{flag} {path} is a symbolic link; name a directory")
    if p.exists() and not p.is_dir():
        raise _error(f"{flag} {path} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not is_marked(p):
        raise _error(f"refusing to replace {path}: {flag} names a non-empty directory that dsv3c did not write "
                     f"(no {MARKER} marker); choose another directory or empty it")
    base = _writable_ancestor(absolute)
    if not base.is_dir():
        raise _error(f"{flag} {path}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise _error(f"{flag} {path}: {base} is not writable")


def prepare_dump_dir(path) -> Path:
    """The dump directory, emptied if an earlier dsv3c run wrote it, created and marked."""
    import shutil

    p = Path(path)
    check_replaceable(p, "--dump-dir")
    if p.is_dir() and is_marked(p):
        shutil.rmtree(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        mark(p)
    except OSError as e:
        raise _error(f"cannot write --dump-dir {path}: {e.strerror or e}") from None
    return p


def _raise_terminated(signum, frame):
    """Signal handler: raise Terminated so the compile unwinds through its cleanup."""
    raise Terminated(signum)


@contextlib.contextmanager
def signals_interrupt():
    """While inside, SIGTERM and SIGHUP raise Terminated (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.signal(s, _raise_terminated) for s in wanted}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
