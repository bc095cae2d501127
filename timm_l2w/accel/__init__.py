"""Accelerators, plugged into the core through named interfaces rather than flags it checks:

- :mod:`.cuda_graphs`: CUDA graphs of the whole training update (``timm-l2w train --cuda-graphs``) and
  :func:`capture_meta_updates`, which installs the L2W hook's meta update as a captured graph through
  the hook's plug (:class:`timm_l2w.meta.MetaUpdateRunner`);
- :mod:`.device_step`: the real step's non-finite skip decided on the device (a fused optimizer kernel);
- :mod:`.device_data`: the training set held on the device (``timm-l2w train --device-data``).
"""
from .cuda_graphs import GraphedMetaUpdates, capture_meta_updates

__all__ = ["GraphedMetaUpdates", "capture_meta_updates"]
