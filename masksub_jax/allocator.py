"""Runs the process under tcmalloc when the machine has it.

XLA on CPU allocates and frees large buffers every step; with glibc's malloc each one comes back as
fresh, zeroed pages, and the page faults cost more than some of the compute (measured: ViT-S/16
MaskSub step 6.8 s with glibc, 4.7 s with tcmalloc; BENCHMARKS.md). tcmalloc keeps the pages.
`main` and `bench` call `reexec_with_tcmalloc()` first: if a tcmalloc library is installed (Debian:
`apt-get install libtcmalloc-minimal4`) and not yet loaded, the process restarts itself with it
preloaded. MASKSUB_NO_TCMALLOC=1 turns this off.
"""
import glob
import os
import sys

SEARCH_PATTERNS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc*.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc*.so.4",
                   "/usr/lib64/libtcmalloc*.so.4", "/usr/lib/libtcmalloc*.so.4", "/usr/local/lib/libtcmalloc*.so*")
_GUARD = "MASKSUB_TCMALLOC_REEXEC"


def find_tcmalloc(patterns=None) -> str | None:
    """The first tcmalloc shared library found, preferring the minimal (no heap profiler) build."""
    found = sorted((p for pattern in patterns or SEARCH_PATTERNS for p in glob.glob(pattern) if "debug" not in p),
                   key=lambda p: "minimal" not in p)
    return found[0] if found else None


def preload_env(env: dict, library: str) -> dict | None:
    """The environment to re-exec with, or None if tcmalloc is loaded, refused, or already tried."""
    preload = env.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or env.get("MASKSUB_NO_TCMALLOC") == "1" or env.get(_GUARD):
        return None
    return {**env, "LD_PRELOAD": f"{library}:{preload}" if preload else library, _GUARD: "1"}


def reexec_with_tcmalloc() -> None:
    """Replaces this process by itself under tcmalloc, when that is possible and not yet the case."""
    library = find_tcmalloc()
    env = preload_env(dict(os.environ), library) if library else None
    if env is not None:
        os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
