"""Moved to :mod:`fedimb.engines.inprocess_grid`; this name stays importable as that
very module (so that patching one patches the other)."""

import sys

from fedimb.engines import inprocess_grid

sys.modules[__name__] = inprocess_grid
