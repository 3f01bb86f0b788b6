"""Build fastpeft and its optional C++ CPU backend (fastpeft._C).

The C++ backend is optional: when no compiler is found, or the build fails and
``FASTPEFT_REQUIRE_CPP`` is not set, fastpeft installs without it and falls back to
Triton (CUDA tensors) or the pure-PyTorch reference. Build with
``pip install --no-build-isolation -e .`` so the already-installed CPU torch is used.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -march=native: the extension is built on the machine that runs it (pip install).
    arch = os.environ.get("FASTPEFT_MARCH", "native")
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-DNDEBUG", f"-march={arch}"]
    ext_modules = [
        CppExtension(
            "fastpeft._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]

    class _OptionalBuild(BuildExtension):
        """Build the extension, but let the install succeed without it."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure degrades
                if os.environ.get("FASTPEFT_REQUIRE_CPP"):
                    raise
                print(f"fastpeft: C++ backend not built ({exc}); falling back", file=sys.stderr)

    cmdclass = {"build_ext": _OptionalBuild.with_options(use_ninja=True)}
except ImportError:
    print("fastpeft: torch not importable at build time; C++ backend skipped", file=sys.stderr)

setup(
    name="fastpeft",
    version="0.1.0",
    description="Parameter-efficient fine-tuning as fast as the frozen model underneath it",
    packages=find_packages(include=["fastpeft", "fastpeft.*"]),
    python_requires=">=3.9",
    install_requires=["numpy"],  # torch is installed first, by hand: see README
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
