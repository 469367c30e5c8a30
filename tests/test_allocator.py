"""Re-executing under tcmalloc: finding the library, the environment, and a real re-exec."""
import glob
import os
import shutil
import subprocess
import sys

from masksub_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_find_prefers_minimal_and_skips_debug(tmp_path):
    for name in ("libtcmalloc.so.4", "libtcmalloc_minimal_debug.so.4", "libtcmalloc_minimal.so.4"):
        (tmp_path / name).write_bytes(b"")
    assert allocator.find_tcmalloc((str(tmp_path / "libtcmalloc*.so.4"),)) == str(tmp_path / "libtcmalloc_minimal.so.4")
    assert allocator.find_tcmalloc((str(tmp_path / "nothing*.so"),)) is None


def test_preload_env():
    env = allocator.preload_env({"LD_PRELOAD": "/a.so", "X": "1"}, "/t/libtcmalloc.so.4")
    assert env["LD_PRELOAD"] == "/t/libtcmalloc.so.4:/a.so" and env["X"] == "1"
    assert allocator.preload_env({}, "/t.so")["LD_PRELOAD"] == "/t.so"
    assert allocator.preload_env({"LD_PRELOAD": "/x/libtcmalloc.so"}, "/t.so") is None  # already loaded
    assert allocator.preload_env({"MASKSUB_NO_TCMALLOC": "1"}, "/t.so") is None  # refused
    assert allocator.preload_env(env, "/t.so") is None  # tried once already: no loop


def test_reexec_restarts_the_same_command_with_the_library_preloaded(tmp_path):
    # A harmless real library stands in for tcmalloc.
    libm = next(p for pattern in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6",
                                  "/lib/aarch64-linux-gnu/libm.so.6", "/lib64/libm.so.6", "/usr/lib64/libm.so.6")
                for p in glob.glob(pattern))
    fake = tmp_path / "libtcmalloc_minimal.so.4"
    shutil.copy(libm, fake)
    code = ("import os, sys; from masksub_jax import allocator; "
            f"allocator.SEARCH_PATTERNS = ({str(fake)!r},); "
            "print('run', os.environ.get('LD_PRELOAD', '-'), sys.argv[1:], flush=True); "
            "allocator.reexec_with_tcmalloc()")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MASKSUB_TCMALLOC_REEXEC")}
    out = subprocess.run([sys.executable, "-c", code, "arg"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=60, check=True).stdout.split("\n")
    assert out[0] == "run - ['arg']"
    assert out[1] == f"run {fake} ['arg']"  # restarted once, same arguments, library preloaded
    assert out[2] == ""
