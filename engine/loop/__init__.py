"""The per-worker training loop, as a recipe (Ray Train's ``train_loop_per_worker``).

- :mod:`engine.loop.recipe`: the loop itself, read top to bottom, and its phases (train step,
  evaluate-and-report, stop decision) as small functions.
- :mod:`engine.loop.setup`: what a worker builds before its first batch (:class:`~engine.loop.setup.Worker`)
  and the resume from the newest complete checkpoint.
- :mod:`engine.loop.state`: the typed :class:`~engine.loop.state.TrainState` a checkpoint saves and restores.
- :mod:`engine.loop.hooks`: gradual unfreezing, fault injection, the forgetting limit and early stopping.
- :mod:`engine.loop.batches`, :mod:`engine.loop.evaluation`, :mod:`engine.loop.window`: collate and
  streams, the validation pass, the loss / throughput window and progress line.
"""

from engine.loop.batches import Collate, ValidationBatches, collate
from engine.loop.recipe import train_loop_per_worker
from engine.loop.setup import plan_steps
from engine.loop.state import TrainState

__all__ = ["Collate", "TrainState", "ValidationBatches", "collate", "plan_steps", "train_loop_per_worker"]
