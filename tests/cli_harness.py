"""Run `dsv3c.cli.main` in-process in a scratch directory and check the rules of issue 13 on the outcome."""

import hashlib
import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path

from dsv3c import cli
from dsv3c.schema import errors, plan_schema

FOREIGN = "precious"  # a user's directory that must survive every command
FOREIGN_FILE = "precious/notes.txt"
COUNTS = {"tried": 0, "clean": 0, "tracebacks": 0, "files_lost": 0}


def listing(root: Path) -> dict:
    """Every file under root (relative path -> sha256), directories as None."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
    return out


def run_case(capsys, argv: list[str], files: dict | None = None, dirs=()) -> tuple[int, list[str], list[str], dict, dict]:
    """main(argv) in a fresh directory holding FOREIGN, `files` (path -> bytes) and `dirs`.

    Returns (exit status, stdout lines, stderr lines, listing before, listing after); counts the case.
    """
    root = Path(tempfile.mkdtemp(prefix="dsv3c-fuzz-"))
    old = os.getcwd()
    try:
        (root / FOREIGN).mkdir()
        (root / FOREIGN_FILE).write_text("keep\n")
        for d in dirs:
            (root / d).mkdir(parents=True, exist_ok=True)
        for name, data in (files or {}).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
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
        after = listing(root)
        lost = [p for p, h in before.items() if after.get(p, "missing") != h]
        COUNTS["files_lost"] += len(lost)
        assert not lost, f"dsv3c {argv} changed or removed {lost}"
        return rc, captured.out.splitlines(), captured.err.splitlines(), before, after
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


def plan_problems(path: Path) -> list[str]:
    """Schema problems of a plan.json written to disk (strict JSON: NaN/Infinity refused)."""
    text = path.read_text()

    def refuse(name):
        raise ValueError(f"plan.json holds {name}")

    return errors(json.loads(text, parse_constant=refuse), plan_schema())
