"""Keep XLA:CPU's per-step scratch memory mapped between steps (Linux with glibc).

XLA:CPU allocates an executable's scratch buffer (activations, gradients: ~1 GiB for the
`small` benchmark config) at every run and frees it at the end; glibc maps such blocks fresh
each time, so the kernel faults in and zeroes every page again at every step (262,000 page
faults and ~0.45 s of system time per `small` step on a 2-core machine). `scratch_cache.c`,
compiled once into the lmjax cache directory and preloaded into the process, keeps freed
blocks of at least 4 MiB mapped for the next request of the same size.

`use_in_this_process()` re-executes the program (same PID, same arguments) with the library
in LD_PRELOAD, which only works before the process has started its work: `lmjax` and the
scripts call it first thing. It is CPU tuning: when the run will use a GPU or TPU
(lmjax.backend.expected_platform, decided without starting CUDA) it does nothing, as it does
with LMJAX_SCRATCH_CACHE=0, without a C compiler, off glibc, or under an LD_PRELOAD of the
user's own (another allocator).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lmjax import default_cache_dir
from lmjax.backend import expected_platform

SOURCE = Path(__file__).with_name("scratch_cache.c")
_REEXEC_MARK = "_LMJAX_SCRATCH_CACHE_PRELOADED"


def supported() -> bool:
    """Linux with glibc, and not turned off with LMJAX_SCRATCH_CACHE=0."""
    return (
        sys.platform.startswith("linux")
        and platform.libc_ver()[0] == "glibc"
        and os.environ.get("LMJAX_SCRATCH_CACHE", "1") != "0"
    )


def library(cache_dir: Path | None = None) -> Path | None:
    """The compiled library (built on first use, keyed by the source's hash); None if it cannot be."""
    if not supported():
        return None
    source = SOURCE.read_bytes()
    path = (
        Path(cache_dir or default_cache_dir())
        / "native"
        / f"scratch_cache-{hashlib.sha256(source).hexdigest()[:12]}.so"
    )
    if path.is_file():
        return path
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            # -z defs: a libc without glibc's __libc_memalign fails here, not at load time.
            subprocess.run(
                [cc, "-O2", "-shared", "-fPIC", "-Wl,-z,defs", "-o", str(built), str(SOURCE), "-lpthread"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(built, path)  # atomic: concurrent builders each install a whole file
    except (OSError, subprocess.SubprocessError):
        return None
    return path


def _to_preload() -> Path | None:
    """The library, unless the user preloads something of their own (jemalloc: it decides)."""
    return None if os.environ.get("LD_PRELOAD", "").strip() else library()


def usable() -> bool:
    """Whether use_in_this_process() would preload the library (no LD_PRELOAD of the user's own)."""
    return _to_preload() is not None


def active() -> bool:
    """Whether the library is loaded in this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "/scratch_cache-" in maps


def use_in_this_process() -> None:
    """Re-execute this program with the library preloaded, once, if the run will be on the CPU;
    returns if it is loaded, cannot be, or the run is for an accelerator."""
    if os.environ.pop(_REEXEC_MARK, None) is not None:
        os.environ.pop("LD_PRELOAD", None)  # the re-executed process: keep it out of the programs it starts
        return
    if expected_platform() != "cpu":
        return
    lib = None if active() else _to_preload()
    if lib is None:
        return
    env = {**os.environ, "LD_PRELOAD": str(lib), _REEXEC_MARK: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
