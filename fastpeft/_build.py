"""The C++ backend's compile flags, and its build on first use when no prebuilt one was installed.

pip builds ``fastpeft._C`` at install time when the build can import torch (``pip install
--no-build-isolation [-e] .``). A build in an isolated environment (plain ``pip install .``) cannot:
torch is deliberately not a build requirement (pip would download a multi-GB CUDA torch into the
isolated environment). Such an install ships the C++ sources as package data (``fastpeft/csrc``), and
the first CPU op compiles them here with ``torch.utils.cpp_extension.load`` (ninja, the same flags
as ``setup.py``): one line on stderr when it starts, a progress line every ~20 s (1-2 min on 2 cores).

The result is cached in ``$FASTPEFT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fastpeft``, else
``~/.cache/fastpeft``), one directory per torch version, Python ABI and hash of (CPU flags, compile
flags, sources), so a changed CPU, torch or source tree never loads a stale build. An exclusive
``flock`` on the directory's lock file serialises builds across processes (released by the kernel if
a builder dies, so no stale locks). ``FASTPEFT_NO_JIT=1`` turns compiling on first use off.

``fastpeft._backend._cpp_status`` is the only caller of :func:`jit_load`; :data:`ORIGIN` says where the
loaded backend came from, for ``python -m fastpeft info``. This module imports no torch at import time:
``setup.py`` reads the compile flags from it.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, List, Optional

#: basename of the library the first-use build writes (``<name>.so``; ``module.cpp`` makes it a
#: Python module named ``_C`` too, but it is loaded with ``torch.ops.load_library``: only its ops matter)
JIT_NAME = "fastpeft_cpu_jit"
SOURCE_GLOBS = ("*.cpp",)
HEADER_GLOBS = ("*.h", "*.hpp")

#: how the C++ backend got here: "prebuilt (path)", "JIT-built (path)", or "missing: why";
#: set by ``fastpeft._backend._cpp_status``
ORIGIN = "not loaded yet"

_lock_in_process = threading.Lock()


def cxx_flags() -> List[str]:
    """Compile flags of the C++ backend, for setup.py and for the build on first use alike.

    ``-march=native``: the extension is built on the machine that runs it (``FASTPEFT_MARCH`` overrides).
    ``-g0``: setup.py's compile line starts with Python's own CFLAGS, which carry ``-g``: debug info
    makes the objects 20x larger and the build ~1.6x slower, and changes no generated code.
    """
    arch = os.environ.get("FASTPEFT_MARCH", "native")
    return ["-O3", "-std=c++17", "-fopenmp", "-DNDEBUG", f"-march={arch}", "-g0"]


LD_FLAGS = ["-fopenmp"]


def source_dir() -> Optional[str]:
    """The directory holding the C++ sources: ``fastpeft/csrc`` (package data of an installed wheel),
    else ``csrc`` next to the package in a source checkout (editable install). None if neither."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(pkg, "csrc")]
    root = os.path.dirname(pkg)
    if os.path.isfile(os.path.join(root, "setup.py")):
        candidates.append(os.path.join(root, "csrc"))
    for d in candidates:
        if glob.glob(os.path.join(d, "*.cpp")):
            return d
    return None


def source_files(src: str) -> List[str]:
    return sorted(f for g in SOURCE_GLOBS for f in glob.glob(os.path.join(src, g)))


def _header_files(src: str) -> List[str]:
    return sorted(f for g in HEADER_GLOBS for f in glob.glob(os.path.join(src, g)))


def cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return f"{platform.machine()} {platform.processor()}"


def cache_root() -> str:
    root = os.environ.get("FASTPEFT_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fastpeft")
    return os.path.abspath(root)


def build_dir(src: str) -> str:
    """``<cache root>/torch<version>-<python tag>-<hash of CPU flags, compile flags and sources>``."""
    import torch

    h = hashlib.sha256()
    for part in (cpu_flags(), " ".join(cxx_flags() + LD_FLAGS), torch.__version__,
                 str(getattr(torch.version, "git_version", "")), sys.version):
        h.update(part.encode() + b"\0")
    for path in source_files(src) + _header_files(src):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    tag = sys.implementation.cache_tag or "py"
    return os.path.join(cache_root(), f"torch{torch.__version__}-{tag}-{h.hexdigest()[:16]}")


def find_ninja() -> Optional[str]:
    """Path of a ninja binary: on PATH, else the ``ninja`` package's (a venv's bin is not on PATH
    unless the venv is activated)."""
    found = shutil.which("ninja")
    if found:
        return found
    cand = [os.path.join(os.path.dirname(sys.executable), "ninja")]
    try:
        import ninja  # the PyPI package

        cand.insert(0, os.path.join(ninja.BIN_DIR, "ninja"))
    except Exception:  # noqa: BLE001 - not installed, or an unexpected layout: look elsewhere
        pass
    return next((c for c in cand if os.access(c, os.X_OK)), None)


@contextmanager
def ninja_on_path() -> Iterator[Optional[str]]:
    """Put :func:`find_ninja`'s directory on PATH for the duration (torch runs ``ninja`` by name)."""
    ninja = find_ninja()
    old = os.environ.get("PATH", "")
    if ninja and shutil.which("ninja") is None:
        os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + old
    try:
        yield ninja
    finally:
        os.environ["PATH"] = old


@contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive lock across processes (and threads: one open file each)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own build baton is the only guard
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _note(f"waiting for another process that is compiling the C++ backend (lock {path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _note(msg: str) -> None:
    print(f"fastpeft: {msg}", file=sys.stderr, flush=True)


def _progress(bdir: str, n_sources: int, t0: float, done: threading.Event, every_s: float = 20.0) -> None:
    while not done.wait(every_s):
        n_obj = len(glob.glob(os.path.join(bdir, "*.o")))
        step = f"{n_obj}/{n_sources} sources compiled" if n_obj < n_sources else "linking"
        _note(f"still compiling the C++ backend: {step}, {time.monotonic() - t0:.0f} s")


def _load_cached(so: str, stamp: str) -> bool:
    if not (os.path.isfile(stamp) and os.path.isfile(so)):
        return False
    import torch

    torch.ops.load_library(so)
    return True


def jit_load(not_prebuilt: str) -> Optional[str]:
    """Load the C++ backend built on first use, building it if needed (see the module docstring).

    ``not_prebuilt`` says why no prebuilt ``fastpeft._C`` loaded. Returns None once the ops are
    registered, else why they could not be, and sets :data:`ORIGIN` either way.
    """
    global ORIGIN
    reason = _jit_load(not_prebuilt)
    if reason is not None:
        ORIGIN = f"missing: {reason}"
    return reason


def _jit_load(not_prebuilt: str) -> Optional[str]:
    global ORIGIN
    if os.environ.get("FASTPEFT_NO_JIT", "0") not in ("", "0"):
        return f"{not_prebuilt}, and FASTPEFT_NO_JIT={os.environ['FASTPEFT_NO_JIT']} turns off compiling it on first use"
    src = source_dir()
    if src is None:
        return (f"{not_prebuilt}, and this install has no C++ sources to compile on first use "
                f"(looked for fastpeft/csrc/*.cpp and a source checkout's csrc/)")
    try:
        bdir = build_dir(src)
        os.makedirs(bdir, exist_ok=True)
    except OSError as exc:
        return f"{not_prebuilt}, and the build cache is not writable ({exc}); set FASTPEFT_CACHE_DIR"
    so = os.path.join(bdir, JIT_NAME + ".so")
    stamp = os.path.join(bdir, "built-ok")
    log = os.path.join(bdir, "build.log")
    with _lock_in_process, _file_lock(os.path.join(bdir, "build.lock")):
        try:
            if _load_cached(so, stamp):  # built before, or by the process we waited for
                ORIGIN = f"JIT-built ({so})"
                return None
        except Exception as exc:  # noqa: BLE001 - a broken cached build: build it again
            _note(f"the cached C++ backend {so} does not load ({type(exc).__name__}: {exc}); rebuilding it")
            os.remove(stamp)
        ninja = find_ninja()
        if ninja is None:
            return f"{not_prebuilt}, and compiling it on first use needs ninja (`pip install ninja`)"
        sources = source_files(src)
        _note(f"{not_prebuilt}; compiling the C++ backend for this machine once, ~1-2 min "
              f"(cached in {bdir}; FASTPEFT_NO_JIT=1 turns this off)")
        t0 = time.monotonic()
        done = threading.Event()
        ticker = threading.Thread(target=_progress, args=(bdir, len(sources), t0, done), daemon=True)
        ticker.start()
        try:
            from torch.utils.cpp_extension import load

            with ninja_on_path():
                load(name=JIT_NAME, sources=sources, extra_cflags=cxx_flags(), extra_ldflags=LD_FLAGS,
                     extra_include_paths=[src], build_directory=bdir, is_python_module=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure is reported, with its log
            with open(log, "w") as f:
                f.write(f"{type(exc).__name__}: {exc}\n")
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            _note(f"compiling the C++ backend failed after {time.monotonic() - t0:.0f} s: {first} "
                  f"(full log: {log})")
            return f"{not_prebuilt}, and compiling it on first use failed: {first} (full log: {log})"
        finally:
            done.set()
        with open(stamp, "w") as f:
            f.write(f"built in {time.monotonic() - t0:.0f} s from {src}\n")
        _note(f"C++ backend compiled in {time.monotonic() - t0:.0f} s: {so}")
    ORIGIN = f"JIT-built ({so})"
    return None
