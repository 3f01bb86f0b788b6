"""Build fastpeft and, where the build can import torch, its C++ CPU backend (fastpeft._C).

Every install route ends with the C++ backend (README, "Install"):

* ``pip install --no-build-isolation [-e] .`` builds against the torch already installed: the
  extension is prebuilt here.
* plain ``pip install .`` builds in an isolated environment without torch (torch is deliberately not a
  build requirement in pyproject.toml: pip would download a multi-GB CUDA build into it). Then the C++
  sources ship as package data (``fastpeft/csrc``) and the first CPU op compiles them
  (``fastpeft/_build.py``).

A failed prebuild does not fail the install unless ``FASTPEFT_REQUIRE_CPP=1``: the build on first use
reports the compiler's error where it happens. Compile flags live in ``fastpeft/_build.py``, shared with
that first-use build.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """fastpeft/_build.py by path: importing the fastpeft package would import torch."""
    spec = importlib.util.spec_from_file_location("_fastpeft_build", os.path.join(HERE, "fastpeft", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_build = _load_build_module()


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the package (fastpeft/csrc), for the build on first use of an install
    whose build could not see torch. An editable install reads csrc/ in the checkout instead."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dst = os.path.join(self.build_lib, "fastpeft", "csrc")
        os.makedirs(dst, exist_ok=True)
        src = os.path.join(HERE, "csrc")
        files = [f for g in _build.SOURCE_GLOBS + _build.HEADER_GLOBS for f in glob.glob(os.path.join(src, g))]
        if not files:
            raise RuntimeError(f"fastpeft: no C++ sources in {src}; the source tree is incomplete")
        for f in files:
            self.copy_file(f, os.path.join(dst, os.path.basename(f)))


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    print("fastpeft: torch is not importable in this build environment (an isolated build?): the C++ "
          "backend is not prebuilt; fastpeft compiles it on first use (or build with "
          "`pip install --no-build-isolation .` after installing torch)", file=sys.stderr)
else:
    ext_modules = [
        CppExtension(
            "fastpeft._C",
            sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": _build.cxx_flags()},
            extra_link_args=list(_build.LD_FLAGS),
        )
    ]

    class _OptionalBuild(BuildExtension):
        """Build the extension, but let the install succeed without it (it is then built on first use)."""

        def run(self):
            ninja = _build.find_ninja()
            if ninja and shutil.which("ninja") is None:  # a venv's bin is on PATH only when activated
                os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + os.environ.get("PATH", "")
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure degrades, loudly
                if os.environ.get("FASTPEFT_REQUIRE_CPP"):
                    raise
                print(f"fastpeft: C++ backend not prebuilt ({exc}); fastpeft will try to compile it on first "
                      "use and report the error there (FASTPEFT_REQUIRE_CPP=1 makes this fail the build)",
                      file=sys.stderr)

    cmdclass["build_ext"] = _OptionalBuild.with_options(use_ninja=True)

setup(
    name="fastpeft",
    version="0.1.0",
    description="Parameter-efficient fine-tuning as fast as the frozen model underneath it",
    packages=find_packages(include=["fastpeft", "fastpeft.*"]),
    python_requires=">=3.9",
    # torch is installed first, by hand (README); ninja runs the C++ build on first use
    install_requires=["numpy", "ninja"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "peft", "transformers", "safetensors"],
        "bench": ["peft", "matplotlib", "tqdm"],
        "demo": ["scikit-learn", "matplotlib", "tqdm", "safetensors"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
