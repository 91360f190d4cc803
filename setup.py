"""setup.py — installs MaskMentor (the method and the three scripts at the top level; util/,
studies/ and tools/ as packages) and builds the fused masking op (csrc/).

    pip install -r requirements.txt
    pip install --no-build-isolation -e .

`--no-build-isolation` lets the build see the torch already installed: the extension
must be compiled against that exact torch, so torch is deliberately not a build
requirement that pip would install into a throw-away environment.

One extension module, `maskmentor_C` (csrc/README.md), optional at run time (without it
masking.py runs its pure-PyTorch reference):
  - with CUDA: csrc/mask_gather.cpp + csrc/mask_gather_cuda.cu, when nvcc is found
    (CUDA_HOME, CUDA_PATH or /usr/local/cuda) and torch is a CUDA build;
  - otherwise C++ only: csrc/mask_gather.cpp.
Environment: MASKMENTOR_BUILD_CUDA=0 builds the C++ module even where CUDA is there;
TORCH_CUDA_ARCH_LIST chooses the GPU architectures (default: the visible GPUs, or, with
none visible, sm_80/86/89/90 + PTX: A100, RTX 30xx/A6000, RTX 40xx/L40, H100/H200, and
newer GPUs through PTX).
"""
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Without a visible GPU: the architectures people train on (Ampere, Ada, Hopper) and PTX,
# which the driver JIT-compiles on anything newer.
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def log(msg: str) -> None:
    print(f"maskmentor setup: {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """A CUDA toolkit directory that really contains bin/nvcc, or None.

    torch's own guess prefers `which nvcc`, whose grandparent directory is wrong when
    nvcc is a wrapper script (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local), so we
    decide here and export CUDA_HOME before torch.utils.cpp_extension reads it.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def compiler_takes_openmp() -> bool:
    """Whether the C++ compiler accepts -fopenmp (gcc does; Apple's clang does not).

    at::parallel_for only runs in parallel when the extension itself is compiled with
    OpenMP (torch's ATen/ParallelOpenMP.h is guarded by _OPENMP), and CppExtension does not
    add -fopenmp. Linking with it records libgomp.so.1, the same library torch loads, so
    the extension shares torch's thread pool. Without it the op runs on one thread.
    """
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            return subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "t")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        except OSError:
            return False


def cuda_or_reason():
    """(True, None) when the CUDA kernels can be built, else (False, why not)."""
    if os.environ.get("MASKMENTOR_BUILD_CUDA", "1") == "0":
        return False, "MASKMENTOR_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return False, "no nvcc found (set CUDA_HOME to a CUDA toolkit)"
    return True, None


def extension():
    openmp = compiler_takes_openmp()
    cxx = ["-O3", "-DPy_LIMITED_API=0x030A0000"] + (["-fopenmp"] if openmp else [])
    link = ["-fopenmp"] if openmp else []
    if not openmp:
        log("the C++ compiler does not take -fopenmp: the CPU kernel will run on one thread")
    cuda, why_not = cuda_or_reason()
    if not cuda:
        log(f"building maskmentor_C with its C++ (CPU) kernels only: {why_not}")
        return CppExtension("maskmentor_C", ["csrc/mask_gather.cpp"], extra_compile_args={"cxx": cxx},
                            extra_link_args=link, py_limited_api=True)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            log("TORCH_CUDA_ARCH_LIST unset: compiling for the visible GPUs")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
            log(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: using {DEFAULT_ARCHS}")
    include_dirs = []
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        # A toolkit with nvcc but without the runtime headers: use those of the CUDA
        # runtime wheel that a CUDA build of torch installs (nvidia/cu13/include).
        wheel_include = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)),
                                     "nvidia", f"cu{torch.version.cuda.split('.')[0]}", "include")
        if os.path.isdir(wheel_include):
            include_dirs.append(wheel_include)
    log(f"building maskmentor_C with its C++ and CUDA kernels (CUDA {torch.version.cuda}, CUDA_HOME={cuda_home}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')})")
    return CUDAExtension("maskmentor_C", ["csrc/mask_gather.cpp", "csrc/mask_gather_cuda.cu"],
                         include_dirs=include_dirs, py_limited_api=True,
                         # --threads: nvcc compiles the architectures in parallel
                         extra_compile_args={"cxx": cxx + ["-DMASKMENTOR_WITH_CUDA=1"],
                                             "nvcc": ["-O3", f"--threads={os.cpu_count() or 1}"]},
                         extra_link_args=link)


# The method and the scripts: one module per top-level file, every one of them installed;
# util/ (what every trainer needs), studies/ (what tests the paper's claims), tools/.
MODULES = sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f != "setup.py")
PACKAGES = ["util", "studies", "tools"]

setup(
    name="maskmentor",
    version="0.1.0",
    description="MaskMentor: RGB-D semantic segmentation pre-training with a MultiMAE-style ViT",
    license="MIT",
    python_requires=">=3.10",
    py_modules=MODULES,
    packages=PACKAGES,
    # The runtime part of requirements.txt; keep the two in step. evaluate.py --export_onnx's
    # packages are an extra: pip install -e .[onnx] (requirements.txt installs them).
    install_requires=["torch>=2.4", "numpy", "pillow", "tqdm", "safetensors", "h5py", "scipy"],
    extras_require={"onnx": ["onnx", "onnxscript", "onnxruntime"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
