"""Export and runtime meet in one direction only.

Rule (checked on the source with ``ast``, lazy imports inside functions included):

* no module under ``engine/runtime`` (``refseg.runtime``) imports ``refseg.export`` in any form
  (``import``, ``from ... import``, relative imports, ``importlib.import_module`` / ``__import__`` of
  a literal name): the runtime reads export folders by the names in ``refseg.runtime.io_names``;
* modules under ``export/`` import from ``refseg.runtime`` only ``refseg.runtime.io_names``, except
  ``export/cli.py``, the ``refseg export`` command, which sits at the CLI layer and warms the
  runtime's TensorRT engine cache through ``refseg.runtime.exported``;
* the export cache's first-use fill reaches the runtime as an argument: the Segmenter (above both)
  hands ``refseg.export.cache_fill.fill_export_folder`` to ``create_backend``.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"refseg.runtime": ROOT / "engine" / "runtime", "refseg.export": ROOT / "export"}


def _modules(package: str):
    folder = PACKAGES[package]
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join((package, *parts)), path, path.name == "__init__.py"


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name ``source`` imports (absolute, resolved relative, or a literal import_module)."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names.add(node.args[0].value)
    return names


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_import_parser_sees_every_form():
    source = ("import refseg.export.wrappers\nfrom refseg.export import manifest\nfrom ..export import aoti\n"
              "def f():\n    from refseg.export.onnx_export import export_models\n"
              "    importlib.import_module('refseg.export.fp16')\n")
    names = imported_names(source, "refseg.runtime.exported")
    for expected in ("refseg.export.wrappers", "refseg.export.manifest", "refseg.export.aoti",
                     "refseg.export.onnx_export", "refseg.export.fp16"):
        assert expected in names
    assert "refseg.runtime.io_names" in imported_names("from . import io_names\n", "refseg.runtime",
                                                       is_package=True)


def test_runtime_never_imports_export():
    found = [f"{path.relative_to(ROOT)} imports {name}"
             for module, path, pkg in _modules("refseg.runtime")
             for name in sorted(imported_names(path.read_text(encoding="utf-8"), module, pkg))
             if _under(name, "refseg.export")]
    assert not found, found


def test_export_imports_only_io_names_from_runtime():
    allowed = {"refseg.runtime", "refseg.runtime.io_names"}  # `from refseg.runtime import io_names`
    found = []
    for module, path, pkg in _modules("refseg.export"):
        if module == "refseg.export.cli":
            continue  # the command (CLI layer), see the module docstring
        for name in sorted(imported_names(path.read_text(encoding="utf-8"), module, pkg)):
            if _under(name, "refseg.runtime") and name not in allowed and not name.startswith("refseg.runtime.io_names."):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not found, found


def test_segmenter_hands_the_exporter_to_the_runtime(monkeypatch):
    import refseg.segmenter as segmenter
    from refseg.config import SegmenterConfig
    from refseg.export.cache_fill import fill_export_folder

    seen = {}

    def fake_create_backend(name, config, **kwargs):
        seen.update(kwargs, name=name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(segmenter, "create_backend", fake_create_backend)
    with pytest.raises(RuntimeError, match="stop here"):
        segmenter.Segmenter(SegmenterConfig(), backend="onnxruntime")
    assert seen["name"] == "onnxruntime" and seen["exporter"] is fill_export_folder


def test_aoti_export_needs_no_onnx():
    """`refseg export --format aoti` (DINOv2 or DINOv3) runs without the onnx extra installed."""
    import subprocess
    import sys

    code = ("import sys\nsys.modules['onnx'] = None  # import onnx raises ImportError, as when it is absent\n"
            "import refseg.export.aoti\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
