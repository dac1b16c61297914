"""Build the compiled extensions of tiger_fast.

One extension per hot path ("stem"): ``tiger_fast._quantize_ext`` and ``tiger_fast._generate_ext``.
Each is built from ``csrc/<stem>_*.cpp`` (always: C++17, OpenMP) and, when ``nvcc`` is found,
``csrc/<stem>_*.cu`` compiled by nvcc and linked statically against cudart.  The ``.cu`` files
include no torch headers (a CPU-only torch cannot build a torch CUDA extension): they take raw
device pointers, sizes and a ``cudaStream_t`` passed as an integer from Python.

Environment:
  TIGER_FAST_CUDA_ARCHS   semicolon/comma list of SM versions, default "90"  (e.g. "80;90")
  TIGER_FAST_NO_CUDA=1    skip the CUDA sources even when nvcc is present
  TIGER_FAST_STEMS        comma list of extensions to build, default "quantize,generate"
  TIGER_FAST_MARCH        -march for the C++ sources, default "native"
  CUDA_HOME               where to look for nvcc / cudart (default: nvcc on PATH, /usr/local/cuda)
"""
import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

# TIGER_FAST_STEMS=quantize builds only that extension (useful while another is being edited).
STEMS = tuple(s for s in os.environ.get("TIGER_FAST_STEMS", "quantize,generate").split(",") if s)
HERE = os.path.dirname(os.path.abspath(__file__))


def find_cuda():
    """Return (nvcc path, cuda root) or (None, reason)."""
    if os.environ.get("TIGER_FAST_NO_CUDA", "") == "1":
        return None, "TIGER_FAST_NO_CUDA=1"
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if shutil.which("nvcc"):
        cands.append(shutil.which("nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    for nvcc in cands:
        if os.path.exists(nvcc):
            root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
            for r in (root, os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
                if r and glob.glob(os.path.join(r, "lib*", "libcudart_static.a")) + glob.glob(
                    os.path.join(r, "targets", "*", "lib", "libcudart_static.a")
                ):
                    return nvcc, r
            return None, f"nvcc found at {nvcc} but libcudart_static.a was not found"
    return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"


def cuda_archs():
    raw = os.environ.get("TIGER_FAST_CUDA_ARCHS", "90")
    return [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]


class BuildExt(build_ext):
    def build_extensions(self):
        nvcc, root = find_cuda()
        for ext in self.extensions:
            stem = ext.name.rsplit("_", 1)[0].split("._")[-1]
            cu = sorted(glob.glob(os.path.join("csrc", f"{stem}_*.cu")))
            if not cu:
                continue
            if nvcc is None:
                print(f"tiger_fast: skipping CUDA sources of {ext.name}: {root}", file=sys.stderr)
                continue
            objs = []
            tmp = os.path.join(self.build_temp, "cuda")
            os.makedirs(tmp, exist_ok=True)
            gencode = []
            for a in cuda_archs():
                gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
            for src in cu:
                obj = os.path.join(tmp, os.path.basename(src) + ".o")
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       "-Icsrc", *gencode]
                print("tiger_fast: " + " ".join(cmd), file=sys.stderr)
                subprocess.check_call(cmd)
                objs.append(obj)
            libdirs = [d for d in glob.glob(os.path.join(root, "lib64")) + glob.glob(
                os.path.join(root, "targets", "*", "lib")) if os.path.isdir(d)]
            ext.extra_objects += objs
            ext.library_dirs += libdirs
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
            ext.define_macros += [("TIGER_FAST_WITH_CUDA", "1")]
            ext.include_dirs += [os.path.join(root, "include")]
        super().build_extensions()


def make_ext(stem):
    srcs = sorted(glob.glob(os.path.join("csrc", f"{stem}_*.cpp")))
    if not srcs:
        return None
    return Pybind11Extension(
        f"tiger_fast._{stem}_ext",
        srcs,
        include_dirs=["csrc"],
        cxx_std=17,
        # -ffp-contract=off: no silent FMA contraction, so float results match the reference bit for bit.
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off",
                            f"-march={os.environ.get('TIGER_FAST_MARCH', 'native')}"],
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[e for e in (make_ext(s) for s in STEMS) if e is not None],
    cmdclass={"build_ext": BuildExt},
)
