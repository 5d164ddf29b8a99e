"""Training IHF-Harmony on site-labelled 2.5D slices."""

from __future__ import annotations

from .data import SliceBank, TrainingVolume
from .loop import TrainConfig, TrainResult, build_site_profiles, load_train_preset, train_model

__all__ = [
    "SliceBank",
    "TrainConfig",
    "TrainResult",
    "TrainingVolume",
    "build_site_profiles",
    "load_train_preset",
    "train_model",
]
