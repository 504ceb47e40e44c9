"""The one adapter around Triton's ahead-of-time compiler: AOTSpec -> ttir/ttgir/llir/ptx/cubin for sm_90a.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` needs no GPU. Capability 90
makes Triton's NVIDIA backend target "sm_90a" (the arch-specific Hopper features: wgmma, TMA,
setmaxnreg); the written PTX's `.target` line is read back to report it.

Compiled kernels are cached on disk under a key made of the kernel's source hash (Triton's
`JITFunction.cache_key`, which covers the jit functions it calls), the signature, constexprs,
divisibility attributes, compile options, the target and the Triton version; a cache hit copies files.

Under TRITON_INTERPRET=1, `@triton.jit` returns an `InterpretedFunction`, which cannot be
compiled, and so is Triton's own jit library (tl.sum, tl.cdiv...). The cache key is then taken from
a `JITFunction` rebuilt from the same Python function (and from the jit functions it calls by
global name), and a miss is compiled in a child Python process without TRITON_INTERPRET.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
ENABLE_FP_FUSION = True  # Triton's default, passed explicitly (silences its warning about the default)
_EXTS = ("ttir", "ttgir", "llir", "ptx", "cubin")


@dataclass(frozen=True)
class AOTSpec:
    """One specialisation of a Triton kernel: its runtime-arg types, constexpr values, options and launch grid."""

    fn: Any  # a @triton.jit function (JITFunction or, under the interpreter, InterpretedFunction)
    signature: dict[str, str]  # runtime arg name -> Triton type ("*fp8e4nv", "*bf16", "*fp32", "i32", "fp32")
    constexprs: dict[str, Any] = field(default_factory=dict)  # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    grid: tuple[int, ...] = (1, 1, 1)
    divisible_by_16: tuple[str, ...] = ()  # runtime args known to be multiples of 16 (pointers: 16-byte aligned)
    name: str | None = None  # file-name stem; the kernel's name when None


_JIT_MEMO: dict[Any, JITFunction] = {}
_GLOBALS: dict[int, tuple[dict, dict]] = {}  # id(module globals) -> (those globals, their compilable copy)


def as_jit(fn: Any) -> JITFunction:
    """fn as a compilable JITFunction (rebuilt from the Python function when it is an InterpretedFunction)."""
    if isinstance(fn, JITFunction):
        return fn
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(fn, InterpretedFunction):
        raise TypeError(f"not a @triton.jit function: {fn!r}")
    if fn in _JIT_MEMO:
        return _JIT_MEMO[fn]
    py = fn.fn
    # One copy of each module's globals, in which every jit function of the module is compilable
    # (helpers must be called by a bare global name for the code generator to find them there).
    fresh = id(py.__globals__) not in _GLOBALS
    if fresh:
        _GLOBALS[id(py.__globals__)] = (py.__globals__, dict(py.__globals__))
    glb = _GLOBALS[id(py.__globals__)][1]
    clone = types.FunctionType(py.__code__, glb, py.__name__, py.__defaults__, py.__closure__)
    clone.__qualname__, clone.__doc__, clone.__module__ = py.__qualname__, py.__doc__, py.__module__
    clone.__kwdefaults__, clone.__annotations__ = py.__kwdefaults__, py.__annotations__
    kwargs = {k: v for k, v in fn.kwargs.items() if k in ("version", "do_not_specialize", "debug", "noinline")}
    jit = _JIT_MEMO[fn] = JITFunction(clone, **kwargs)  # registered before recursing: cycles terminate
    if fresh:
        for k, v in py.__globals__.items():
            if isinstance(v, InterpretedFunction):
                glb[k] = as_jit(v)
    return jit


def _source(spec: AOTSpec, jit: JITFunction) -> ASTSource:
    """The ASTSource of spec: every kernel arg typed, constexprs marked "constexpr"."""
    names = jit.arg_names
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(names)
    missing = set(names) - set(spec.signature) - set(spec.constexprs)
    if unknown or missing:
        raise ValueError(f"{jit.__name__}: unknown args {sorted(unknown)}, untyped args {sorted(missing)}")
    sig = {n: spec.signature.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible_by_16}
    return ASTSource(jit, sig, dict(spec.constexprs), attrs)


def _options(spec: AOTSpec) -> dict:
    """The compile options of spec."""
    return {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": ENABLE_FP_FUSION}


def spec_key(spec: AOTSpec) -> str:
    """Hex hash of everything that determines the compiled kernel: source, signature, constexprs, options, Triton."""
    jit = as_jit(spec.fn)
    material = {
        "source": jit.cache_key,
        "signature": spec.signature,
        "constexprs": {k: repr(v) for k, v in spec.constexprs.items()},
        "divisible_by_16": sorted(spec.divisible_by_16),
        "options": _options(spec),
        "target": [TARGET.backend, TARGET.arch, TARGET.warp_size],
        "triton": triton.__version__,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _arch_of(ptx: str) -> str:
    """The `.target` arch of a PTX module (e.g. "sm_90a")."""
    m = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M)
    return m.group(1) if m else f"sm_{TARGET.arch}"


def _compile_into(spec: AOTSpec, stem: str, dest: Path) -> dict:
    """Compiles spec with Triton, writes its five files as dest/stem.<ext>, returns the record."""
    kernel = triton.compile(_source(spec, as_jit(spec.fn)), target=TARGET, options=_options(spec))
    files = {}
    for ext in _EXTS:
        data = kernel.asm[ext]
        (dest / f"{stem}.{ext}").write_bytes(data if isinstance(data, bytes) else data.encode())
        files[ext] = f"{stem}.{ext}"
    return {
        "name": kernel.name,
        "arch": _arch_of(kernel.asm["ptx"]),
        "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages,
        "shared_bytes": kernel.metadata.shared,
        "grid": list(spec.grid),
        "files": files,
    }


def _compile_in_child(spec: AOTSpec, stem: str, dest: Path) -> dict:
    """Compiles spec in a Python child process without TRITON_INTERPRET and returns the record."""
    # Under the interpreter Triton's own library (tl.sum, tl.cdiv, ...) is interpreted too, so
    # the code generator cannot compile a kernel that calls it; a clean process can.
    py = spec.fn.fn
    request = {"module": py.__module__, "qualname": py.__qualname__, "stem": stem, "dest": str(dest),
               "spec": {k: getattr(spec, k) for k in ("signature", "constexprs", "num_warps", "num_stages",
                                                      "grid", "divisible_by_16", "name")}}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1" if ENABLE_FP_FUSION else "0"
    proc = subprocess.run([sys.executable, "-m", __name__], input=pickle.dumps(request), env=env,
                          capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"AOT compile of {stem} failed:\n{proc.stderr.decode(errors='replace')}")
    return json.loads((dest / "record.json").read_text())


def _child_main() -> None:
    """Child-process entry: compiles the pickled request from stdin and writes dest/record.json."""
    req = pickle.loads(sys.stdin.buffer.read())
    fn = importlib.import_module(req["module"])
    for part in req["qualname"].split("."):
        fn = getattr(fn, part)
    dest = Path(req["dest"])
    record = _compile_into(AOTSpec(fn=fn, **req["spec"]), req["stem"], dest)
    (dest / "record.json").write_text(json.dumps(record, indent=1, sort_keys=True))


def _compile(spec: AOTSpec, stem: str, dest: Path) -> dict:
    """Compiles spec into dest (in a child process when spec.fn is interpreted), writing record.json."""
    if isinstance(spec.fn, JITFunction):
        record = _compile_into(spec, stem, dest)
        (dest / "record.json").write_text(json.dumps(record, indent=1, sort_keys=True))
        return record
    return _compile_in_child(spec, stem, dest)


def spec_stem(spec: AOTSpec) -> str:
    """The name of a specialisation's compiled files and cache entry: kernel name and key prefix."""
    return f"{spec.name or as_jit(spec.fn).__name__}_{spec_key(spec)[:16]}"


def compile_aot(spec: AOTSpec, out_dir, cache_dir=None) -> dict:
    """Compiles spec for sm_90a into out_dir (through the on-disk cache when given) and returns its record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = spec_stem(spec)
    if cache_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            _compile(spec, stem, Path(tmp))
            return _copy_entry(Path(tmp), out_dir)
    entry = Path(cache_dir) / stem
    if not (entry / "record.json").exists():
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=entry.parent))
        try:
            _compile(spec, stem, tmp)
            os.rename(tmp, entry)  # atomic publish
        except OSError:
            if not (entry / "record.json").exists():  # not a concurrent writer that won the rename
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _copy_entry(entry, out_dir)


def _copy_entry(entry: Path, out_dir: Path) -> dict:
    """Copies a compiled entry's files to out_dir and returns its record."""
    record = json.loads((entry / "record.json").read_text())
    for rel in record["files"].values():
        shutil.copyfile(entry / rel, out_dir / rel)
    return record


if __name__ == "__main__":
    _child_main()
