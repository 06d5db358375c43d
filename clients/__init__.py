"""Flower ClientApps of fedimb (thin: the math lives in :mod:`fedimb`)."""
