"""Ctrl-C during a Ray call that handles SIGINT itself (Ray Train aborts gracefully and then raises or exits
with nothing said of the interrupt) is still known, so the command exits 130."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cluster.run.interrupts import Interrupted, watch_interrupts


@pytest.fixture
def swallowing_handler():
    previous = signal.signal(signal.SIGINT, lambda *args: None)  # like Ray Train's own handler
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)


def test_an_interrupt_is_seen_even_when_another_handler_swallows_it(swallowing_handler):
    with watch_interrupts() as interrupted:
        assert not interrupted()
        ctrl_c()
    assert interrupted()  # still known after the block (Tune returns normally after a Ctrl-C)


def test_what_ray_raises_after_an_interrupt_becomes_interrupted(swallowing_handler):
    with pytest.raises(Interrupted):
        with watch_interrupts():
            ctrl_c()
            raise SystemExit(0)  # what Ray Train's handler does once the run is aborted


def test_errors_without_an_interrupt_pass_through(swallowing_handler):
    with pytest.raises(ValueError):
        with watch_interrupts() as interrupted:
            raise ValueError("a real failure")
    assert not interrupted()
