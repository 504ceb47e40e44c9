"""Ahead-of-time compilation of a lowered graph's kernel specialisations, through the on-disk cache, in parallel.

Each distinct KernelSpec is compiled by `dsv3c.codegen.triton_aot.compile_aot` for sm_90a. Specialisations whose
compiled code is identical (same source, types, constexprs, divisibility and options: the same cache key)
share one set of files. Cache misses are compiled first by worker processes (one per core, at most `jobs`),
each a clean Python without TRITON_INTERPRET that takes specs one at a time from this process, so the
slowest kernels do not serialise the rest; then every spec is taken from the cache into <out>/kernels/.

Cache: `cache_dir`, else $DSV3C_CACHE_DIR, else ~/.cache/dsv3c/kernels.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dsv3c.codegen.family import KernelSpec, interpreting


def default_cache_dir() -> Path:
    """$DSV3C_CACHE_DIR, else ~/.cache/dsv3c/kernels."""
    env = os.environ.get("DSV3C_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dsv3c" / "kernels"


def stem_of(k: KernelSpec) -> str:
    """The compiled files' stem (and cache entry name) of a spec, as compile_aot names them."""
    from dsv3c.codegen.triton_aot import spec_stem

    return spec_stem(k.aot())


def compile_kernels(kernels, out_dir, cache_dir=None, jobs: int | None = None, progress=None) -> dict:
    """Compile every KernelSpec into out_dir (via the cache); returns {KernelSpec: record}.

    progress(done, total, name, seconds) is called once per kernel actually compiled (cache misses).
    """
    from dsv3c.codegen.triton_aot import compile_aot

    out_dir, cache = Path(out_dir), Path(cache_dir) if cache_dir else default_cache_dir()
    stems = {k: stem_of(k) for k in kernels}
    first: dict[str, KernelSpec] = {}
    for k in kernels:
        first.setdefault(stems[k], k)
    misses = [k for s, k in sorted(first.items()) if not (cache / s / "record.json").exists()]
    if misses:
        _compile_misses(misses, cache, jobs, progress)
    return {k: compile_aot(k.aot(), out_dir, cache) for k in kernels}


def _compile_misses(misses: list[KernelSpec], cache: Path, jobs: int | None, progress) -> None:
    """Populate the cache with the missing specs, in worker processes when that helps."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(misses)))
    total = len(misses)
    if jobs == 1 and not interpreting():  # in-process: no worker start-up cost
        from dsv3c.codegen.triton_aot import compile_aot

        with tempfile.TemporaryDirectory() as tmp:
            for i, k in enumerate(misses, 1):
                t0 = time.perf_counter()
                compile_aot(k.aot(), tmp, cache)
                if progress:
                    progress(i, total, k.name, time.perf_counter() - t0)
        return
    work: queue.Queue = queue.Queue()
    for k in misses:
        work.put(k)
    lock, done, errors = threading.Lock(), [0], []

    def worker():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.Popen([sys.executable, "-m", "dsv3c.codegen.kernel_build", str(cache)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        try:
            while not errors:
                try:
                    k = work.get_nowait()
                except queue.Empty:
                    break
                proc.stdin.write(json.dumps(k.to_json()) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    errors.append(f"compile worker died on {k.name}:\n{proc.stderr.read()}")
                    break
                reply = json.loads(line)
                if "error" in reply:
                    errors.append(f"AOT compile of {k.name} failed:\n{reply['error']}")
                    break
                with lock:
                    done[0] += 1
                    if progress:
                        progress(done[0], total, k.name, reply["seconds"])
        finally:
            proc.stdin.close()
            proc.wait()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])


def _worker_main(cache: str) -> None:
    """Worker: compile each JSON KernelSpec line of stdin into the cache; reply one JSON line per spec."""
    import traceback

    from dsv3c.codegen.triton_aot import compile_aot

    with tempfile.TemporaryDirectory() as tmp:
        for line in sys.stdin:
            t0 = time.perf_counter()
            try:
                compile_aot(KernelSpec.from_json(json.loads(line)).aot(), tmp, cache)
                reply = {"seconds": round(time.perf_counter() - t0, 3)}
            except Exception:
                reply = {"error": traceback.format_exc()}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    _worker_main(sys.argv[1])
