"""One ``timm-l2w train`` run, its parts each with one job; the command (:mod:`timm_l2w.cli.train`) sits above.

- :mod:`timm_l2w.training.loop`: :func:`~timm_l2w.training.loop.train`, the loop over loader batches
  (halves, updates, epoch ends, checkpoints, stops, the final evaluation).
- :mod:`timm_l2w.training.run`: :class:`~timm_l2w.training.run.Run`, the run's pieces built from its
  settings (data, model, optimizer, schedule, Mixup / criterion, L2W, EMA) and the checks of them.
- :mod:`timm_l2w.training.update`: the update (forward, meta step, weighted loss, backward, optimizer
  step), its skips of non-finite steps, sync-free and CUDA-graph paths, and its counters.
- :mod:`timm_l2w.training.summary`: the epoch's running sums, the per-epoch rows (``log.json`` /
  ``log.csv``) and the history of them.
- :mod:`timm_l2w.training.checkpoints`: the checkpoint folders, writing one atomically, finding and
  restoring one, and the weights files to share.
- :mod:`timm_l2w.training.stops`: :class:`~timm_l2w.training.stops.TrainingStopped` and the test hook
  that stops a run at a chosen point.

Nothing here imports :mod:`timm_l2w.cli`.
"""
