"""The measurement window of the loop: the training loss and throughput since the last evaluation, and
the progress line on the console. Nothing here waits for the device inside a step."""

from __future__ import annotations

import logging
import time

import torch

from engine.loop.worker_output import RunEvents
from engine.perf.speed import ThroughputMeter

log = logging.getLogger("engine.loop")
LOG_EVERY_S = 5.0


def progress_line(step: int, total: int, loss: float, eta_s: float, width: int = 24) -> str:
    """A log-friendly progress bar: ``step 40/96 [##########--------------]  42%  loss 0.8123  eta 35s``."""
    done = int(width * step / max(total, 1))
    return f"step {step}/{total} [{'#' * done}{'-' * (width - done)}] {100 * step / max(total, 1):3.0f}%  loss {loss:.4f}  eta {eta_s:.0f}s"


class TrainWindow:
    """Micro-batches and their summed loss (a device tensor) since the last evaluation, the throughput
    ``meter`` over the same window, and the timing of the progress line (rank 0 logs it every
    ``LOG_EVERY_S``; the driver's console gets it when :meth:`RunEvents.progress_due`)."""

    def __init__(self, meter: ThroughputMeter, device: torch.device, rank: int, total_steps: int, events: RunEvents):
        self.meter, self.device, self.rank, self.total_steps, self.events = meter, device, rank, total_steps, events
        self.micro, self.loss_sum = 0, torch.zeros((), device=device)
        self.last_loss: torch.Tensor | None = None
        self.last_log = self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        """Count one micro-batch's loss (no host sync)."""
        self.micro += 1
        self.loss_sum += loss.detach().float()
        self.last_loss = loss

    def mean_loss(self) -> float:
        """The mean training loss of the window's micro-batches (syncs)."""
        return (self.loss_sum / self.micro).item()

    def reset(self) -> None:
        """Start the next window (after an evaluation)."""
        self.micro, self.loss_sum = 0, torch.zeros((), device=self.device)
        self.meter.reset()

    def show_progress(self, step: int) -> None:
        """The progress line after optimizer step ``step``, when one is due."""
        if self.rank == 0 and time.perf_counter() - self.last_log > LOG_EVERY_S:
            self.last_log = time.perf_counter()
            eta = (self.last_log - self.started) / step * (self.total_steps - step)
            log.info(progress_line(step, self.total_steps, self.last_loss.item(), eta))
        if self.events.progress_due(step, self.total_steps):
            elapsed = time.perf_counter() - self.started
            self.events.send("progress", step=step, total=self.total_steps, loss=self.last_loss.item(),
                             eta=elapsed / step * (self.total_steps - step))
