"""Builds cogvx_kernels._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build
and nvcc is found (COGVX_BUILD_CUDA=0|1 forces the choice).

torch is needed at build time, so install it first and build with
`pip install --no-build-isolation -e .` (scripts/setup_env.sh does both). The package's metadata and
dependencies: pyproject.toml.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit("cogvx: torch must be installed before building (pip install torch, then "
             "pip install --no-build-isolation -e .)")

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The CUDA toolkit root. The nvcc on PATH may be a wrapper script, so ask nvcc itself."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            return os.path.realpath(line.split("TOP=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def wheel_cuda_include_dirs():
    """Headers of the pip CUDA wheels (nvidia/cu13/include) that torch's CUDA headers expect."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu1*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def arch_tokens(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "8.0 9.0") as "8.0,9.0+PTX": a define value that needs no
    quoting in the build's shell commands."""
    entries = [e for e in re.split(r"[;\s]+", arch_list) if e]
    bad = [e for e in entries if not re.fullmatch(r"[A-Za-z0-9.+_]+", e)]
    if bad:
        sys.exit(f"cogvx: TORCH_CUDA_ARCH_LIST has entries this build cannot record: {bad} (expected e.g. 8.0;9.0+PTX)")
    return ",".join(entries)


def want_cuda():
    forced = os.environ.get("COGVX_BUILD_CUDA")
    cuda_home = find_cuda_home()
    if forced == "0":
        return False, None
    if forced == "1":
        if cuda_home is None:
            sys.exit("cogvx: COGVX_BUILD_CUDA=1 but nvcc was not found (put it on PATH or set CUDA_HOME)")
        if torch.version.cuda is None:
            sys.exit("cogvx: COGVX_BUILD_CUDA=1 but the installed torch is a CPU-only build")
        return True, cuda_home
    return (torch.version.cuda is not None and cuda_home is not None), cuda_home


def extensions():
    build_cuda, cuda_home = want_cuda()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard (C++20 for 2.14)
    extra = {"cxx": cxx_flags}
    ext_cls = cpp_extension.CppExtension
    if build_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch read it at import time, before we found it
        # cubins for A100 (runs on every sm_8x) and H100, PTX of sm_90 for newer GPUs (JIT-compiled by
        # the driver: Blackwell sm_100 / sm_120 run the kernels instead of "no kernel image")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        # kernels split by family (csrc/cuda/<op>_*.cu) plus each op's host entry points (<op>.cpp):
        # ninja compiles them in parallel (MAX_JOBS jobs, else ninja's default of about the core count)
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        include_dirs += wheel_cuda_include_dirs()
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas", "-v",
                         "--expt-relaxed-constexpr"]
        # what the build holds, for backend choice (cogvx_kernels._C.cuda_arch_list, csrc/ops.cpp)
        cxx_flags += ["-DCOGVX_WITH_CUDA", f"-DCOGVX_CUDA_ARCHS={arch_tokens(os.environ['TORCH_CUDA_ARCH_LIST'])}"]
        ext_cls = cpp_extension.CUDAExtension
    print(f"cogvx: building _C with CUDA={'yes (' + cuda_home + ', archs ' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if build_cuda else 'no'}",
          flush=True)
    return [ext_cls("cogvx_kernels._C", sources, include_dirs=include_dirs,
                    extra_compile_args=extra, extra_link_args=["-fopenmp"])]


# The metadata and dependencies are in pyproject.toml; this file adds the extension.
setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
