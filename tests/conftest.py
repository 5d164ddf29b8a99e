"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """A tiny traveling-phantom dataset: 3 subjects x 3 sites, all modalities, seed 0.

    Generated once per test session (a few seconds); treat it as read-only.
    Returns the :class:`ihf_bids.phantom.PhantomDataset` describing it.
    """
    from ihf_bids.phantom import generate_phantom

    root = tmp_path_factory.mktemp("tiny_phantom") / "bids"
    return generate_phantom(root, n_subjects=3, n_sites=3, size="tiny", seed=0)
