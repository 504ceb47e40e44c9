"""Reading user files: regular files only (a FIFO or a device is never opened), capped sizes, JSON with a depth
and integer-length limit, TOML likewise. Every reader of a user file goes through here.

Each function takes the error class to raise (the caller's ConfigError, TargetError, ...) and a short
description of the file (`what`), so the one-line message names the file and the problem.
"""

import itertools
import json
import os
import re
import stat
import tomllib

KiB, MiB = 1 << 10, 1 << 20
# Size caps: each is far above any real file of its kind (DeepSeek-V3's config.json is 1.7 KiB, its expert load
# for 58 MoE layers x 256 experts about 100 KiB, a pass's stats.json a few KiB).
MAX_CONFIG_BYTES = 16 * MiB
MAX_TARGET_BYTES = 1 * MiB
MAX_EXPERT_LOAD_BYTES = 16 * MiB
MAX_DUMP_BYTES = 64 * MiB  # a pass's graph.txt of DeepSeek-V3 is about 5 MiB
MAX_JSON_DEPTH = 32  # the deepest real input (config.json's quantization_config) nests 3 levels
MAX_INT_DIGITS = 19  # |n| < 10**19: every count and size a user file holds fits, and float(n) stays exact enough

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path, what: str, error=ValueError) -> os.stat_result:
    """The stat of path if it is a regular file or a link to one (never opened here); error otherwise."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError as e:
        raise error(f"cannot read {what} {name}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {name} is {_kind(st.st_mode)}, not a regular file")
    return st


def read_capped(path, what: str, limit: int, error=ValueError) -> bytes:
    """The bytes of a regular file of at most limit bytes; error (one line) for anything else. Never blocks."""
    name = os.fspath(path)
    regular_file(name, what, error)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise error(f"cannot read {what} {name}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)  # the file opened may have been swapped since the check
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {name} is {_kind(st.st_mode)}, not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, MiB))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise error(f"cannot read {what} {name}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise error(f"{what} {name} is larger than {limit:,} bytes")
    return b"".join(chunks)


def read_text(path, what: str, limit: int, error=ValueError) -> str:
    """A capped regular file decoded as UTF-8 (error naming the first bad byte otherwise)."""
    data = read_capped(path, what, limit, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {os.fspath(path)} is not UTF-8 text (byte {e.start})") from None


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


class _LongInteger(ValueError):
    """An integer literal with more than MAX_INT_DIGITS digits."""


def _bounded_int(literal: str) -> int:
    """json's parse_int: the integer, unless it has more than MAX_INT_DIGITS digits."""
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise _LongInteger(literal)
    return int(literal)


def parse_json(text: str, what: str, error=ValueError):
    """The JSON value of text, refused (error) beyond MAX_JSON_DEPTH levels or MAX_INT_DIGITS-digit integers.

    NaN and Infinity literals parse (as Python writes them); the callers check their numbers are finite.
    """
    if json_depth(text) > MAX_JSON_DEPTH:
        raise error(f"{what} nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_int)
    except _LongInteger as e:
        raise error(f"{what} holds an integer of {len(str(e).lstrip('-')):,} digits (at most {MAX_INT_DIGITS})") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e.msg} at line {e.lineno}") from None


def load_json(path, what: str, limit: int, error=ValueError):
    """The JSON value of a capped regular UTF-8 file (see parse_json for the limits)."""
    return parse_json(read_text(path, what, limit, error), f"{what} {os.fspath(path)}", error)


def load_toml(path, what: str, limit: int, error=ValueError) -> dict:
    """The table of a capped regular UTF-8 TOML file; error for malformed or too deeply nested TOML."""
    text = read_text(path, what, limit, error)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"malformed {what} {os.fspath(path)}: {e}") from None
    except RecursionError:
        raise error(f"malformed {what} {os.fspath(path)}: nested too deeply") from None
