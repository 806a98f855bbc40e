"""Optional dependencies: imported lazily, with one clear message naming the extra to install, and the
versions of installed packages (for reports, manifests and ``refseg info``)."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Iterable

log = logging.getLogger(__name__)


class MissingDependencyError(ImportError):
    """An optional package needed for the requested feature is not installed."""


def require(module: str, extra: str, purpose: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``pip install refseg[extra]`` (and the
    PyPI ``package`` that provides it, by default the module's top-level name)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingDependencyError(
            f"{purpose} needs the optional package '{top}', which is not installed: "
            f"pip install 'refseg[{extra}]' (or pip install {package or top})") from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (the import is attempted once)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def versions(distributions: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each named distribution (``importlib.metadata``, nothing is imported), ``None``
    when it is not installed: the one versions report of benchmark results, export manifests and
    ``refseg info``."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in distributions:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
