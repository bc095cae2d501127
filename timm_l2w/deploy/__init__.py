"""Ship an early-exit model: the per-stage ONNX / torch.export package.

* :func:`export_package` (``timm-l2w export``): one ONNX graph (and, on request, one ``.pt2`` program) per stage,
  ``manifest.json`` and ``policy.json`` in a folder.
* :mod:`timm_l2w_runtime` (``timm-l2w predict``): runs that folder with numpy + onnxruntime only.
* :func:`measure_target_latency`: the latency table of a model on eager PyTorch or onnxruntime
  (``timm-l2w eval --latency-budget``).

The exit policy it ships is written by :mod:`timm_l2w.inference.policy`; how images are prepared, as
the policy records it, is :mod:`timm_l2w.preprocessing`. See docs/deploy.md.
"""
from .export import export_package
from .latency import measure_target_latency

__all__ = ["export_package", "measure_target_latency"]
