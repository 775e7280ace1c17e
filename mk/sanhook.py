"""Start-up hook of the sanitizer venvs (build/asan/venv, build/tsan/venv).

mk/hardening.mk copies this file into the venv's site-packages as
``chirp_sanhook.py`` together with a one-line ``chirp_san.pth``::

    import chirp_sanhook; chirp_sanhook.install(SO, DEPS, LOG)

so it runs at start-up in every interpreter started as that venv's python: the
pytest process and every child the tests and examples spawn (they all start
``sys.executable``: tests/nodeproc.py, tests/hostproc.py, ``python -m libchirp``,
examples/*.py, the CLI's bench peer), whatever PYTHONPATH they set. It

* adds DEPS (the site-packages of .venv: pytest, cffi, the editable libchirp)
  behind the venv's own site-packages;
* puts a finder first on ``sys.meta_path`` that answers ``libchirp._ffi`` with
  the sanitizer build SO, so the rest of libchirp (pure Python) still comes from
  the source tree while the in-place libchirp/_ffi*.so is never loaded;
* after the module is loaded, proves it from /proc/self/maps: the only mapped
  ``_ffi*.so`` must be SO and the sanitizer runtime must be mapped too (LD_PRELOAD
  reached the process). One line per process goes to LOG (``OK`` or ``BAD``), which
  the make target checks; a BAD load also raises ImportError, failing the test.
"""

import importlib.machinery
import importlib.util
import os
import site
import sys

_SO = None
_LOG = None


def _mapped_objects():
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                paths.add(parts[5].strip())
    return paths


def _record(status, detail):
    argv = getattr(sys, "orig_argv", sys.argv)[1:]  # orig_argv keeps "-m module"
    line = "%s pid=%d ffi=%s argv=%s\n" % (status, os.getpid(), detail, " ".join(argv))
    with open(_LOG, "a") as f:  # O_APPEND: lines of concurrent processes do not mix
        f.write(line)


class _Loader(importlib.machinery.ExtensionFileLoader):
    def exec_module(self, module):
        super().exec_module(module)
        mapped = _mapped_objects()
        ffis = sorted(p for p in mapped if os.path.basename(p).startswith("_ffi") and ".so" in p)
        runtimes = [p for p in mapped if os.path.basename(p).startswith(("libasan.", "libtsan.", "libclang_rt."))]
        same = [os.path.realpath(p) for p in ffis] == [os.path.realpath(_SO)]
        if same and runtimes and os.path.realpath(module.__file__) == os.path.realpath(_SO):
            _record("OK", _SO)
            return
        detail = "mapped=%s runtime=%s" % (",".join(ffis) or "-", ",".join(runtimes) or "-")
        _record("BAD", detail)
        raise ImportError("sanitizer run: libchirp._ffi is not the sanitizer build (%s)" % detail)


class _Finder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "libchirp._ffi":
            return None
        return importlib.util.spec_from_file_location(name, _SO, loader=_Loader(name, _SO))


def install(so, deps, log):
    global _SO, _LOG
    _SO, _LOG = so, log
    site.addsitedir(deps)
    sys.meta_path.insert(0, _Finder)
