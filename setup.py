"""refseg: one-shot, reference-guided, training-free medical image segmentation.

The source folders are installed under one import name:
``engine/`` -> ``refseg``, ``kernels/`` -> ``refseg.kernels``, ``export/`` -> ``refseg.export``.
"""
from setuptools import find_packages, setup

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
        "torchvision",
        "triton",                 # Triton kernels are tested with TRITON_INTERPRET=1 on CPU
        "onnx>=1.15",
        "onnxruntime>=1.17",
        "scikit-learn",
        "scipy",
        "safetensors",
        "matplotlib",             # the benchmark report's plot is tested too
    ],
    "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
    "gpu": ["onnxruntime-gpu>=1.17", "triton", "tensorrt>=10"],
    "io": ["nibabel", "pydicom", "tifffile", "tiffslide", "safetensors"],
    "dist": ["ray"],
    "bench": ["matplotlib", "scikit-learn", "segment-anything==1.0", "torchvision"],  # + dinov2 --no-deps for the baseline
}

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
    license="Apache-2.0",
)
