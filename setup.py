"""refseg: one-shot, reference-guided, training-free medical image segmentation.

The source folders are installed under one import name:
``engine/`` -> ``refseg``, ``kernels/`` -> ``refseg.kernels``, ``export/`` -> ``refseg.export``.
"""
import glob
import logging

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

_ROOTS = {"refseg": "engine", "refseg.kernels": "kernels", "refseg.export": "export"}


def _packages():
    packages, package_dir = [], {}
    for name, folder in _ROOTS.items():
        package_dir[name] = folder
        packages.append(name)
        for sub in find_packages(folder):
            packages.append(f"{name}.{sub}")
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()

EXTRAS = {
    "test": [
        "pytest>=7",
        "pytest-benchmark>=4",
        "segment-anything==1.0",  # official SAM oracle (imports torchvision)
        "sam2==1.1.0",            # official SAM 2 oracle; install with SAM2_BUILD_CUDA=0 (no CUDA extension)
        "torchvision",
        "triton",                 # Triton kernels are tested with TRITON_INTERPRET=1 on CPU
        "onnx>=1.15",
        "onnxruntime>=1.17",
        "scikit-learn",
        "scipy",
        "safetensors",
        "matplotlib",             # the benchmark report's plot is tested too
        "scikit-image",           # MedSAM's official pre-processing (skimage resize) as the test oracle
        "ray>=2.40",              # tests/test_distributed.py runs a local Ray cluster
        "nibabel",                # NIfTI volumes (tests/test_volume*.py)
        "pydicom",                # DICOM series written and read by tests/test_volume_io.py
        "tifffile", "openslide-python", "openslide-bin", "shapely",  # whole-slide tests
        "transformers>=4.56",     # DINOv3ViTModel: the DINOv3 parity oracle (tests/test_dinov3_parity.py)
        "opencv-python-headless", "rasterio",  # label outlines: OpenCV + GDAL tracers (tests/test_outlines.py)
    ],
    "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
    "gpu": ["onnxruntime-gpu>=1.17", "triton", "tensorrt>=10"],
    # Only what the code imports: raster (tifffile), checkpoints (safetensors), volume/dicom (nibabel, pydicom).
    "io": ["tifffile", "safetensors", "nibabel", "pydicom"],
    # opencv-python-headless + rasterio (GDAL): label outlines (refseg.io.outlines_trace)
    "slides": ["tifffile", "openslide-python", "openslide-bin", "shapely>=2.1", "opencv-python-headless", "rasterio"],
    "medsam": ["scipy"],          # MedSAM pre-processing (refseg.models.sam_transforms)
    "dist": ["ray>=2.40"],        # refseg.jobs.ray_pool (refseg segment --ray): Ray core actors
    "bench": ["matplotlib", "scikit-learn", "segment-anything==1.0", "torchvision"],  # + dinov2 --no-deps for the baseline
    "methods": ["scipy", "pot"],  # matcher preset: Hungarian matching (scipy), EMD score (POT, optional)
}



class OptionalBuildExt(build_ext):
    """Build refseg._C (the C++ prompt engine); without a working compiler / pybind11, warn and go on:
    refseg then runs its pure-torch path (refseg.pipeline.native logs which one is used)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure leaves the pure-Python install
            logging.warning("refseg._C not built (%s); the pure-torch prompt engine will be used", exc)

    def build_extension(self, ext):
        try:
            import pybind11
        except ImportError:
            logging.warning("pybind11 missing: refseg._C not built; the pure-torch prompt engine will be used")
            return
        ext.include_dirs.append(pybind11.get_include())
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            logging.warning("refseg._C not built (%s); the pure-torch prompt engine will be used", exc)


# refseg._C: pybind11 bindings over the C API (csrc/include/refseg.h), compiled from the C API's sources without
# LibTorch (the prompt engine of csrc/core, resampling, mask cleaning, presets; model calls answer
# REFSEG_ERR_UNSUPPORTED). No floating-point contraction: every sum must round like the torch reference.
NATIVE = Extension(
    "refseg._C", sorted(glob.glob("csrc/core/*.cpp")) + sorted(glob.glob("csrc/api/*.cpp"))
    + ["csrc/pipeline/resample.cpp", "csrc/python/module.cpp"],
    include_dirs=["csrc/include", "csrc/api"], language="c++",
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True)),  # a changed header (presets.h ...) rebuilds it
    extra_compile_args=["-std=c++17", "-O2", "-ffp-contract=off", "-fvisibility=hidden"])

setup(
    name="refseg",
    version="0.1.0",
    description="One-shot reference-guided training-free medical image segmentation engine "
                "(DINOv2 matching + SAM prompting)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    install_requires=["torch>=2.1", "numpy>=1.23", "pillow>=9", "tqdm>=4"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["refseg=refseg.cli:main"]},
    ext_modules=[NATIVE],
    cmdclass={"build_ext": OptionalBuildExt},
    license="Apache-2.0",
)
