"""Progress of long steps: a bar with a time estimate on a terminal, plain log lines otherwise.

Cluster jobs write their standard error to files, where a redrawn bar is noise; there the
same loop logs ``<what>: i/n (p %), about T s left`` at most every ``log_every`` seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str, unit: str = "item",
             logger: logging.Logger | None = None, log_every: float = 30.0,
             terminal: bool | None = None) -> Iterator[T]:
    """Yield ``items`` while showing progress.

    Parameters
    ----------
    items : iterable
        What to iterate over.
    total : int, optional
        Number of items (``len(items)`` when it has one).
    desc : str
        What is being done, e.g. ``"evaluating T1w"``.
    unit : str
        Name of one item in the bar.
    logger : logging.Logger, optional
        Where log lines go when not on a terminal (default ``ihf_bids``).
    log_every : float
        Seconds between log lines (the first and last item are always logged).
    terminal : bool, optional
        Force the bar (True) or log lines (False); default: whether stderr is a terminal.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if terminal is None:
        terminal = sys.stderr.isatty()
    if terminal:
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit)
        return
    log = logger or logging.getLogger("ihf_bids")
    start = last = time.monotonic()
    count = 0
    for count, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if count == 1 or count == total or now - last >= log_every:
            last = now
            elapsed = now - start
            if total:
                left = elapsed / count * (total - count)
                log.info("%s: %d/%d (%d %%), %.0f s elapsed, about %.0f s left", desc, count, total,
                         100 * count // total, elapsed, left)
            else:
                log.info("%s: %d done, %.0f s elapsed", desc, count, elapsed)
