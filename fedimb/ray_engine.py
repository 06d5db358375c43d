"""Moved to :mod:`fedimb.engines.ray`; this name stays importable as that very module
(so that patching one patches the other)."""

import sys

from fedimb.engines import ray

sys.modules[__name__] = ray
