"""fedimb: federated learning under class imbalance, simulated with Flower and PyTorch.

The core (config, data, losses, models, training, metrics) imports and runs without
starting Flower or Ray; :mod:`fedimb.sim` launches a run on either engine.
"""

__version__ = "0.1.0"
