"""Compiled CPU kernels, bound to XLA through jax's FFI.

XLA:CPU is slow at attention (small-contraction batched matmuls and a softmax over materialised logits); the kernel in
``cpu_attention.cc`` does the whole of one (sequence, head) pair in cache-sized blocks on XLA's intra-op thread pool.

The package ships the C++ source, not a binary: the first call on a machine compiles it with the system's C++
compiler (``$CXX``, else ``c++``/``g++``/``clang++``) for that CPU (``-march=native``) against the FFI headers of the
installed jaxlib, in a few seconds, and caches the library under ``$SHOW1_KERNEL_CACHE`` (default
``~/.cache/show1_jax/kernels``), keyed by the source, jaxlib version, compiler and CPU. Without a compiler, or with
``SHOW1_CPU_KERNELS=0``, :func:`cpu_attention_kernel` returns None once with a warning and attention stays on XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax

SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET = "show1_cpu_attention"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    return Path(os.environ.get("SHOW1_KERNEL_CACHE") or Path.home() / ".cache" / "show1_jax" / "kernels")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the machine type."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def build(compiler: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile ``cpu_attention.cc`` (or reuse the cached library) and return the shared library's path.

    Raises:
      RuntimeError: no C++ compiler was found, or it failed (its message is included).
    """
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found: install g++ or clang++, or set CXX")
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jax.__version__.encode(), compiler.encode(), " ".join(FLAGS).encode()):
        key.update(part)
    key.update(_cpu_fingerprint().encode())
    out_dir = Path(out_dir or cache_dir())
    lib = out_dir / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders each publish a complete library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def cpu_attention_kernel() -> str | None:
    """Build, load and register the CPU attention kernel once per process; its FFI target name, or None.

    None (with one warning) when ``SHOW1_CPU_KERNELS=0`` or the kernel cannot be built here.
    """
    if os.environ.get("SHOW1_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as err:
        warnings.warn(
            f"show1-jax: CPU attention kernel unavailable, attention runs on XLA (slower): {err}", stacklevel=2
        )
        return None
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.Show1CpuAttention), platform="cpu")
    return TARGET
