"""Run `dsv3c.cli.main` (in-process) or `python -m dsv3c.cli` (a child under memory and time limits) in a scratch
directory holding a user's files, and check the rules of issues 13 and 21 on the outcome."""

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from dsv3c import cli
from dsv3c.schema import errors, plan_schema

FOREIGN = "precious"  # a user's directory that must survive every command
FOREIGN_FILE = "precious/notes.txt"
LINKS = {"link_dir": FOREIGN, "link_file": FOREIGN_FILE, "dangling": "missing/nowhere"}  # the user's links
COUNTS = {"tried": 0, "clean": 0, "tracebacks": 0, "files_lost": 0, "exit_0": 0, "exit_2": 0, "subprocesses": 0}
CHILD_MEMORY = 4 << 30  # address space of a child dsv3c (torch and a tiny compile need about 2.5 GiB)
CHILD_SECONDS = 240


def listing(root: Path) -> dict:
    """Every path under root (relative -> sha256 of a file, '-> target' of a link, None for a directory).

    Links are not followed, so a user's link to a directory is one entry, not the directory's contents twice."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = None
    return out


def make_scratch(files: dict | None = None, dirs=()) -> Path:
    """A fresh directory holding FOREIGN (with a file), the user's LINKS, `dirs` and `files` (path -> bytes)."""
    root = Path(tempfile.mkdtemp(prefix="dsv3c-fuzz-"))
    (root / FOREIGN).mkdir()
    (root / FOREIGN_FILE).write_text("keep\n")
    for name, target in LINKS.items():
        (root / name).symlink_to(target)
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _under(path: str, outputs) -> bool:
    """Whether path (relative) lies at or under one of the output paths (relative, normalised)."""
    return any(path == o or path.startswith(o + "/") for o in outputs)


def touched_outside(before: dict, after: dict, outputs=()) -> list[str]:
    """Paths created, changed or removed that are not at or under the given outputs (new folders leading to an
    output, made to hold it, excepted)."""
    outs = [os.path.normpath(o) for o in outputs if o and not os.path.isabs(o)]
    changed = {p for p in set(before) | set(after) if before.get(p, "absent") != after.get(p, "absent")}
    made = {p for p in changed if p not in before and after.get(p, "absent") is None and any(_under(o, [p]) for o in outs)}
    return sorted(p for p in changed - made if not _under(p, outs))


def run_in_process(capsys, argv: list[str], files: dict | None = None, dirs=()) -> tuple[int, list, list, dict, dict]:
    """main(argv) in a scratch directory (make_scratch); (exit status, stdout lines, stderr lines, listing before,
    listing after). An exception out of main is counted and fails the test."""
    root = make_scratch(files, dirs)
    old = os.getcwd()
    try:
        before = listing(root)
        capsys.readouterr()
        os.chdir(root)
        COUNTS["tried"] += 1
        try:
            rc = cli.main(list(argv))
        except BaseException:  # noqa: BLE001  (any escape is the bug being counted)
            COUNTS["tracebacks"] += 1
            raise AssertionError(f"traceback from dsv3c {argv}:\n{traceback.format_exc()}") from None
        finally:
            os.chdir(old)
        captured = capsys.readouterr()
        return rc, captured.out.splitlines(), captured.err.splitlines(), before, listing(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_case(capsys, argv: list[str], files: dict | None = None, dirs=()) -> tuple[int, list[str], list[str], dict, dict]:
    """run_in_process, asserting no pre-existing file was changed or removed."""
    result = run_in_process(capsys, argv, files, dirs)
    before, after = result[3], result[4]
    lost = [p for p, h in before.items() if after.get(p, "missing") != h]
    COUNTS["files_lost"] += len(lost)
    assert not lost, f"dsv3c {argv} changed or removed {lost}"
    return result


def _limits():
    """preexec_fn of a child dsv3c: an address-space limit (bounded memory)."""
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


def run_child(argv: list[str], files: dict | None = None, dirs=()) -> tuple[int, list[str], list[str], dict, dict]:
    """`python -m dsv3c.cli argv` in a scratch directory under CHILD_MEMORY and CHILD_SECONDS; like run_case but
    without the no-loss assertion (the caller checks what it allows)."""
    root = make_scratch(files, dirs)
    try:
        before = listing(root)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        COUNTS["tried"] += 1
        COUNTS["subprocesses"] += 1
        proc = subprocess.run([sys.executable, "-m", "dsv3c.cli", *argv], cwd=root, env=env, capture_output=True,
                              text=True, timeout=CHILD_SECONDS, preexec_fn=_limits, stdin=subprocess.DEVNULL)
        return proc.returncode, proc.stdout.splitlines(), proc.stderr.splitlines(), before, listing(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_clean(result, argv, allow_success: bool = False, out_dir: str | None = None) -> None:
    """Assert the outcome is clean: exit 2 with one error line and nothing written, or (if allowed) a valid plan."""
    rc, out, err, before, after = result
    if rc == 2:
        assert len(err) == 1 and err[0].startswith("dsv3c: error: "), f"{argv}: stderr {err}"
        assert after == before, f"{argv}: exit 2 but wrote {sorted(set(after) - set(before))}"
    else:
        assert allow_success and rc == 0, f"dsv3c {argv} exited {rc}: {err}"
        new = set(after) - set(before)
        assert all(p == out_dir or p.startswith(f"{out_dir}/") for p in new), f"{argv} wrote outside {out_dir}: {new}"
    COUNTS["clean"] += 1


def check_one_clean_error(capsys, case) -> None:
    """case (argv, files, dirs, words): exit 2 with one line containing words, nothing touched."""
    argv, files, dirs, words = case
    result = run_case(capsys, argv, files, dirs)
    check_clean(result, argv)
    assert result[0] == 2
    assert words in result[2][0], result[2]


def check_fuzz(result, argv, outputs) -> None:
    """The fuzz properties: exit 0 or 2; no traceback; exit 2 prints one error line and touches nothing; exit 0
    touches nothing but the command's outputs."""
    rc, out, err, before, after = result
    assert not any("Traceback" in line for line in err), f"dsv3c {argv}: traceback\n" + "\n".join(err)
    assert rc in (0, 2), f"dsv3c {argv} exited {rc}: {err[-3:]}"
    outside = touched_outside(before, after, () if rc == 2 else outputs)
    COUNTS["files_lost"] += len([p for p in outside if p in before])
    assert not outside, f"dsv3c {argv} (exit {rc}) touched {outside}"
    if rc == 2:
        assert len(err) == 1 and err[0].startswith("dsv3c: error: "), f"{argv}: stderr {err}"
    COUNTS["exit_0" if rc == 0 else "exit_2"] += 1
    COUNTS["clean"] += 1


def plan_problems(path: Path) -> list[str]:
    """Schema problems of a plan.json written to disk (strict JSON: NaN/Infinity refused)."""
    text = path.read_text()

    def refuse(name):
        raise ValueError(f"plan.json holds {name}")

    return errors(json.loads(text, parse_constant=refuse), plan_schema())
