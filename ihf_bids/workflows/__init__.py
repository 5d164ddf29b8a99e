"""nipype workflow factories (``init_*_wf``): the only part of ihf-bids that knows nipype."""

from __future__ import annotations
