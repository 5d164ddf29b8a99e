"""ihf-bids: image-level multi-site MRI harmonization (IHF-Harmony) as a BIDS App."""

from __future__ import annotations

__all__ = ["__version__"]

try:  # installed metadata is the single source of the version
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("ihf-bids")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0+unknown"
