"""The ``ihf-bids`` command: :mod:`.parser` (arguments and checks) and :mod:`.run` (main)."""

from __future__ import annotations
