"""The installed layout: one import name, the console script, and a CMake project that configures."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_folders_install_under_one_import_name():
    import refseg
    import refseg.export
    import refseg.kernels
    import refseg.models

    assert Path(refseg.__file__).parent == ROOT / "engine"
    assert Path(refseg.kernels.__file__).parent == ROOT / "kernels"
    assert Path(refseg.export.__file__).parent == ROOT / "export"
    assert callable(refseg.Segmenter.from_preset) and callable(refseg.engineer_points)


def test_optional_dependency_message_names_the_extra():
    from refseg.optional import MissingDependencyError, require

    with pytest.raises(MissingDependencyError, match=r"pip install 'refseg\[io\]'"):
        require("surely_not_installed_pkg", extra="io", purpose="testing")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures(tmp_path):
    result = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
