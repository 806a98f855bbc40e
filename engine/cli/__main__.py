"""``python -m refseg.cli``: the ``refseg`` command."""
import sys

from refseg.cli import main

sys.exit(main())
