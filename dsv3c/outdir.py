"""Output safety: dsv3c deletes only what it wrote, checks every output path before any work, and cleans up on
SIGINT, SIGTERM and SIGHUP alike.

An output directory dsv3c writes carries a marker file, `.dsv3c-output`: a regular file (never a link) whose first
line is `dsv3c <version>` and whose other lines list, relative to the directory, every file and directory
(`name/`) dsv3c wrote there: its manifest. Replacing the directory deletes only those paths, and is refused,
naming them, when the directory holds anything else (a user's file, a link, a marker that is a link).
"""

import contextlib
import os
import re
import signal
import sys
import threading
from pathlib import Path

MARKER = ".dsv3c-output"
MAX_MARKER_BYTES = 16 << 20
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)
_SHOWN = 3  # foreign paths named in an error


class OutputError(ValueError):
    """An output path dsv3c cannot or may not write; the message is one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a compile: unwinds (and cleans up) like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---- the manifest ----------------------------------------------------------------------------------------------


def entries(directory) -> list[str]:
    """Every path under directory but its marker, relative, sorted; directories end in '/', links are not followed."""
    root = Path(directory)
    out = []

    def unreadable(e: OSError):
        raise OutputError(f"cannot read {e.filename}: {e.strerror or e}")

    for top, dirs, files in os.walk(root, onerror=unreadable):
        rel = Path(top).relative_to(root)
        out += [(rel / d).as_posix() + ("" if os.path.islink(os.path.join(top, d)) else "/") for d in dirs]
        out += [(rel / f).as_posix() for f in files]
    return sorted(p for p in out if p != MARKER)


def mark(directory, written=None) -> None:
    """Write the marker of directory: dsv3c's version, then the manifest (written, or everything there now)."""
    from dsv3c import __version__

    root = Path(directory)
    paths = entries(root) if written is None else sorted(set(written))
    (root / MARKER).write_text("\n".join([f"dsv3c {__version__}", *paths]) + "\n")


def manifest(directory) -> set[str] | None:
    """The paths the marker of directory lists, or None without a marker (a regular file starting 'dsv3c ')."""
    from dsv3c.inputs import read_text

    marker = Path(directory) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    lines = read_text(marker, "output marker", MAX_MARKER_BYTES, OutputError).splitlines()
    return set(lines[1:]) if lines and lines[0].startswith("dsv3c ") else None


def is_marked(directory) -> bool:
    """Whether directory carries dsv3c's output marker."""
    return manifest(directory) is not None


def foreign(directory) -> list[str]:
    """What directory holds that dsv3c did not write (everything, when it has no marker)."""
    owned = manifest(directory) or set()
    return [p for p in entries(directory) if p not in owned]


def _inside(root: Path, rel: str) -> bool:
    """Whether rel names a path strictly inside root, reached through real directories only (no links, no '..')."""
    parts = rel.rstrip("/").split("/")
    if rel.startswith("/") or not all(parts) or any(p in (".", "..") for p in parts):
        return False
    parent = root.joinpath(*parts[:-1])
    return os.path.realpath(parent) == os.path.join(os.path.realpath(root), *parts[:-1]).rstrip(os.sep)


def remove_owned(directory) -> list[str]:
    """Delete what the manifest of directory lists, its marker, and directory itself when emptied; what is left."""
    root = Path(directory)
    for rel in sorted(manifest(root) or (), reverse=True):  # a directory's files sort after it: removed first
        if not _inside(root, rel):
            continue
        path = root / rel.rstrip("/")
        with contextlib.suppress(OSError):
            if rel.endswith("/"):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()  # only once empty: a foreign file inside keeps it
            elif not path.is_dir() or path.is_symlink():
                path.unlink()
    left = entries(root)
    if not left:
        (root / MARKER).unlink(missing_ok=True)
        root.rmdir()
    return left


def _refuse_foreign(path, flag: str) -> None:
    """OutputError unless the directory at path holds only what dsv3c wrote there."""
    p = Path(path)
    if (p / MARKER).is_symlink():
        raise OutputError(f"refusing to replace {path}: its {MARKER} is a symbolic link, not a marker dsv3c wrote")
    others = foreign(p)
    if not others:
        return
    if manifest(p) is None:
        raise OutputError(f"refusing to replace {path}: {flag} names a non-empty directory that dsv3c did not write "
                          f"(no {MARKER} marker); choose another directory or empty it")
    more = f" and {len(others) - _SHOWN} more" if len(others) > _SHOWN else ""
    raise OutputError(f"refusing to replace {path}: it holds what dsv3c did not write ({', '.join(others[:_SHOWN])}"
                      f"{more}); move that away or choose another directory")


# ---- checking output paths ---------------------------------------------------------------------------------


def safe_name(name: str, what: str) -> str:
    """name, if it can be one path component under the output root; else an OutputError naming it."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise OutputError(f"{what} {name!r} cannot name an output directory: use letters, digits, '.', '_', '+', '-'")
    return name


def _existing_ancestor(path: Path) -> Path:
    """The nearest existing ancestor of path (path itself if it exists)."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path("/")


def _check_parent(path, flag: str, create: bool) -> None:
    """OutputError unless the folder of path exists (or, with create, can be made) as a writable directory."""
    absolute = Path(path).absolute()
    parent = absolute.parent if not create else _existing_ancestor(absolute.parent)
    if not os.path.lexists(parent):
        raise OutputError(f"{flag} {path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: {parent} is not writable")


def check_replaceable(path, flag: str) -> None:
    """Refuse (OutputError) a --out/--dump-dir dsv3c may not write: cwd or its ancestors, files, foreign dirs."""
    p = Path(path)
    if str(path).strip() == "" or p.name in ("", ".", ".."):
        raise OutputError(f"{flag} {str(path)!r} must name a directory of its own, not '', '.', '..' or a root")
    resolved = p.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"{flag} {path} is the current directory or one of its parents; name a new directory")
    if p.is_symlink():
        raise OutputError(f"{flag} {path} is a symbolic link; name a directory")
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {path} exists and is not a directory")
    if p.is_dir():
        _refuse_foreign(p, flag)
    _check_parent(p, flag, create=True)


def check_output_file(path, flag: str) -> Path:
    """Refuse (OutputError) a file path dsv3c cannot write: empty, a directory, a link or device, under a missing
    folder or under a file. A regular file there is replaced (the user named it)."""
    text = os.fspath(path)
    if text.strip() == "" or text.endswith(("/", os.sep)):
        raise OutputError(f"{flag} {text!r} must name a file")
    p = Path(text)
    if p.is_symlink():
        raise OutputError(f"{flag} {text} is a symbolic link; name a file")
    if p.is_dir():
        raise OutputError(f"{flag} {text} is a directory; name a file")
    if os.path.lexists(p) and not p.is_file():
        raise OutputError(f"{flag} {text} exists and is not a regular file")
    _check_parent(p, flag, create=False)
    return p


# ---- writing and replacing ------------------------------------------------------------------------------------


def prepare_dump_dir(path) -> Path:
    """The dump directory, emptied of what an earlier dsv3c run wrote, created and marked (empty manifest)."""
    p = Path(path)
    check_replaceable(p, "--dump-dir")
    try:
        if p.is_dir():
            remove_owned(p)
        p.mkdir(parents=True, exist_ok=True)
        mark(p, ())
    except OSError as e:
        raise OutputError(f"cannot write --dump-dir {path}: {e.strerror or e}") from None
    return p


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging directory to out atomically; an older out loses only what dsv3c wrote there."""
    old = None
    if os.path.lexists(out):
        _refuse_foreign(out, "--out")  # again: a file may have come since the check before the work
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        left = remove_owned(old)
        if left:  # put there in the instant between the check and the move
            print(f"dsv3c: warning: kept {old}: it holds what dsv3c did not write ({', '.join(left[:_SHOWN])})",
                  file=sys.stderr)


def missing_dirs(path) -> list[Path]:
    """path and those of its ancestors that do not exist yet, innermost first: what writing there creates."""
    absolute = Path(path).absolute()
    return [p for p in (absolute, *absolute.parents) if not os.path.lexists(p)]


def remove_unused(directories) -> None:
    """Remove each directory (innermost first) that holds nothing but possibly a marker: what a failed run made."""
    for d in directories:
        d = Path(d)
        with contextlib.suppress(OSError):
            if d.is_dir() and not d.is_symlink() and not entries(d):
                (d / MARKER).unlink(missing_ok=True)
                d.rmdir()


# ---- signals ------------------------------------------------------------------------------------------------


def _interrupt(signum: int) -> KeyboardInterrupt:
    """The exception a signal unwinds with: KeyboardInterrupt for SIGINT, Terminated for SIGTERM and SIGHUP."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _raise_terminated(signum, frame):
    """Signal handler: raise Terminated so the compile unwinds through its cleanup."""
    raise Terminated(signum)


@contextlib.contextmanager
def signals_interrupt():
    """While inside, SIGTERM and SIGHUP raise Terminated (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_terminated) for s in _SIGNALS if s != signal.SIGINT}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred():
    """While inside, SIGINT/SIGTERM/SIGHUP are held; the first one held is raised on leaving. For the steps that
    create, publish or remove output directories, which must not stop half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if held:
            raise _interrupt(held[0])
