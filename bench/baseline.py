"""The research-style baseline, for scripts run from the source checkout.

The code lives in the package (``refseg.benchmark.baseline``) so that ``refseg bench`` works from an
installed refseg; this module only re-exports it.
"""
from refseg.benchmark.baseline import *  # noqa: F401,F403
from refseg.benchmark.baseline import __all__  # noqa: F401
