"""The parts of one ``timm-l2w train`` run, each with one job; :mod:`timm_l2w.train` is the command and its
loop, and assembles them (``train._Run``).

- :mod:`timm_l2w.training.update`: the update (forward, meta step, weighted loss, backward, optimizer
  step), its skips of non-finite steps, sync-free and CUDA-graph paths, and its counters.
- :mod:`timm_l2w.training.summary`: the epoch's running sums, the per-epoch rows (``log.json`` /
  ``log.csv``) and the history of them.
- :mod:`timm_l2w.training.checkpoints`: the checkpoint folders, writing one atomically, finding and
  restoring one, and the weights files to share.
- :mod:`timm_l2w.training.stops`: :class:`~timm_l2w.training.stops.TrainingStopped` and the test hook
  that stops a run at a chosen point.

These modules sit below :mod:`timm_l2w.train`: they never import it.
"""
