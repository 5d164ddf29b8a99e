"""Progress of long steps: log lines with a time estimate off a terminal, a bar on one."""

from __future__ import annotations

import logging

from ihf_bids.progress import progress


def test_log_lines_with_estimate(caplog):
    caplog.set_level(logging.INFO, logger="ihf_bids")
    assert list(progress(range(5), desc="evaluating T1w", unit="participant", terminal=False, log_every=0)) == [
        0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert lines[0].startswith("evaluating T1w: 1/5 (20 %)") and "s left" in lines[0]
    assert lines[-1].startswith("evaluating T1w: 5/5 (100 %)")


def test_first_and_last_always_logged(caplog):
    caplog.set_level(logging.INFO, logger="ihf_bids")
    list(progress(iter(range(50)), total=50, desc="work", terminal=False, log_every=3600))
    assert [r.getMessage().split(":")[1].split()[0] for r in caplog.records] == ["1/50", "50/50"]


def test_bar_on_a_terminal(capsys):
    assert sum(progress(range(3), desc="training", unit="step", terminal=True)) == 3
    err = capsys.readouterr().err
    assert "training" in err and "3/3" in err
