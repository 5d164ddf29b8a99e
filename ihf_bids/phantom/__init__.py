"""The traveling phantom: a simulated multi-site BIDS dataset with known truth.

Every simulated subject is scanned at every site, so the same anatomy is seen
through each site's protocol, coil, resolution, noise and intensity scale.
See ``docs/phantom.md``.

Examples
--------
>>> from ihf_bids.phantom import generate_phantom, read_head_motion
>>> ds = generate_phantom("phantom_bids", n_subjects=2, n_sites=2)  # doctest: +SKIP
>>> ds.image_path("01", "ge", "T1w")  # doctest: +SKIP
PosixPath('.../phantom_bids/sub-01/ses-ge/anat/sub-01_ses-ge_T1w.nii.gz')
>>> read_head_motion("phantom_bids", "01", "ge").shape  # doctest: +SKIP
(4, 4)
"""

from __future__ import annotations

from .generate import MODALITIES, PHANTOM_SIZES, PhantomDataset, generate_phantom
from .motion import read_head_motion
from .sites import AnatProtocol, DwiProtocol, SiteProtocol, site_protocols
from .tissues import TISSUES, TissueProperties

__all__ = [
    "MODALITIES",
    "PHANTOM_SIZES",
    "TISSUES",
    "AnatProtocol",
    "DwiProtocol",
    "PhantomDataset",
    "SiteProtocol",
    "TissueProperties",
    "generate_phantom",
    "read_head_motion",
    "site_protocols",
]
