"""Package layout rules of the GPU paths: no module shares a name with a function of its package, and
export / runtime meet in one direction only (export imports runtime's file names, never the reverse)."""
import ast
import importlib
import pkgutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _walk(package_name):
    package = importlib.import_module(package_name)
    for info in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
        yield info.name


def test_no_module_is_shadowed_by_a_package_attribute():
    # `import refseg.kernels.similarity` must give the module, not a function of the same name.
    clashes = []
    for top in ("refseg.kernels", "refseg.export"):
        for name in _walk(top):
            try:
                module = importlib.import_module(name)
            except ImportError:  # optional dependency absent: still check the file name below
                module = None
            parent_name, _, leaf = name.rpartition(".")
            attr = getattr(importlib.import_module(parent_name), leaf, None)
            if module is not None and attr is not module:
                clashes.append(f"{name} is shadowed by {attr!r}")
    assert not clashes, clashes
    import refseg.kernels.similarity as sim
    import refseg.kernels.clustering as clu
    assert sim.__name__ == "refseg.kernels.similarity" and clu.__name__ == "refseg.kernels.clustering"
    import refseg.kernels
    assert callable(refseg.kernels.match) and callable(refseg.kernels.kmeans)
