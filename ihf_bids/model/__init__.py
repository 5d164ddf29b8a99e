"""The IHF-Harmony network, its frozen VGG19 feature extractor and its losses (pure torch)."""

from __future__ import annotations

from .flow import AAN, FlowConfig, IHFBlock, IHFHarmony, LevelConfig, restore_background, squeeze, unsqueeze
from .losses import HarmonyLoss, artefact_consistency_loss, spatial_correlative_loss
from .vgg import (
    VGG19Features,
    channel_statistics,
    load_vgg19,
    shifted_statistics,
    site_shift,
    split_embedding,
    target_embedding,
    to_vgg_input,
)

__all__ = [
    "AAN",
    "FlowConfig",
    "HarmonyLoss",
    "IHFBlock",
    "IHFHarmony",
    "LevelConfig",
    "VGG19Features",
    "artefact_consistency_loss",
    "channel_statistics",
    "load_vgg19",
    "restore_background",
    "shifted_statistics",
    "site_shift",
    "split_embedding",
    "spatial_correlative_loss",
    "squeeze",
    "target_embedding",
    "to_vgg_input",
    "unsqueeze",
]
