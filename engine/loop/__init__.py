"""The per-worker training loop, as a recipe (Ray Train's ``train_loop_per_worker``).

- :mod:`engine.loop.recipe`: the loop itself, read top to bottom, and its phases (train step,
  evaluate-and-report, stop decision) as small functions.
- :mod:`engine.loop.setup`: what a worker builds before its first batch (:class:`~engine.loop.setup.Worker`)
  and the resume from the newest complete checkpoint.
- :mod:`engine.loop.state`: the typed :class:`~engine.loop.state.TrainState` a checkpoint saves and restores.
- :mod:`engine.loop.hooks`: gradual unfreezing, fault injection, the forgetting limit and early stopping.
- :mod:`engine.loop.batches`, :mod:`engine.loop.evaluation`, :mod:`engine.loop.window`: collate and
  streams, the validation pass, the loss / throughput window and progress line.
- :mod:`engine.loop.optim`: parameter groups and LR ratios, the LR schedule.
- :mod:`engine.loop.faults`, :mod:`engine.loop.worker_output`: fault injection for recovery tests; the workers'
  log files and rank 0's events to the driver's console.

Nothing is imported here: a module of the loop loads only what it needs.
"""
