"""Training: loss and splits (eqs 10-11), the eq-16 schedule, the Adam loop with checkpoints.

``from jerald_nbk.train import train, Objective, TrainConfig``.
"""

from .loop import Objective, TrainConfig, TrainResult, train

__all__ = ["Objective", "TrainConfig", "TrainResult", "train"]
