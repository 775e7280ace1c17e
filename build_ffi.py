"""CFFI build script: compiles csrc/*.c into the extension module libchirp._ffi.

The cdef is csrc/chirp_ffi.h verbatim (a declarations-only header). Compiler
and linker flags for libuv and OpenSSL come from pkg-config; CHIRP_CFLAGS and
CHIRP_LDFLAGS add flags (e.g. ``-fsanitize=address``) for sanitizer builds.

``python build_ffi.py --out DIR`` builds the extension outside the source tree
(DIR/libchirp/_ffi.<suffix>.so, objects under DIR too) and prints the path of
the .so; `make asan` and `make tsan` use it so the in-place build is untouched.
"""

import glob
import os
import shlex
import subprocess

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _pkg_config(*args):
    try:
        out = subprocess.run(
            ["pkg-config", *args, "libuv", "openssl"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out)


def _flags():
    cflags = _pkg_config("--cflags") or []
    libs = _pkg_config("--libs")
    include_dirs = [CSRC] + [f[2:] for f in cflags if f.startswith("-I")]
    extra_compile = ["-std=c11", "-D_GNU_SOURCE", "-O2", "-g"]
    extra_compile += [f for f in cflags if not f.startswith("-I")]
    if libs is None:
        libraries, library_dirs, extra_link = ["uv", "ssl", "crypto"], [], []
    else:
        libraries = [f[2:] for f in libs if f.startswith("-l")]
        library_dirs = [f[2:] for f in libs if f.startswith("-L")]
        extra_link = [f for f in libs if not f.startswith(("-l", "-L"))]
    extra_compile += shlex.split(os.environ.get("CHIRP_CFLAGS", ""))
    extra_link += shlex.split(os.environ.get("CHIRP_LDFLAGS", ""))
    return include_dirs, libraries, library_dirs, extra_compile, extra_link


ffibuilder = FFI()
with open(os.path.join(CSRC, "chirp_ffi.h")) as f:
    ffibuilder.cdef(f.read())

_include_dirs, _libraries, _library_dirs, _extra_compile, _extra_link = _flags()
# setuptools wants sources relative to the source tree; ffibuilder.compile()
# (the --out build below) runs the compiler in its build directory.
_sources = sorted(glob.glob(os.path.join(CSRC, "*.c")))
if __name__ != "__main__":
    _sources = [os.path.relpath(p, HERE) for p in _sources]
ffibuilder.set_source(
    "libchirp._ffi",
    '#include "chirp.h"',
    sources=_sources,
    include_dirs=_include_dirs,
    libraries=_libraries,
    library_dirs=_library_dirs,
    extra_compile_args=_extra_compile,
    extra_link_args=_extra_link,
)

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="build libchirp._ffi")
    parser.add_argument("--out", default=".", help="build directory (default: in place)")
    out = os.path.abspath(parser.parse_args().out)
    print(os.path.abspath(ffibuilder.compile(tmpdir=out, verbose=True)))
