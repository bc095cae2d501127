"""Ship an early-exit model: the exit policy file and the per-stage ONNX / torch.export package.

* :func:`export_package` (``timm-l2w export``): one ONNX graph and one ``.pt2`` program per stage,
  ``manifest.json`` and ``policy.json`` in a folder.
* :mod:`timm_l2w_runtime` (``timm-l2w predict``): runs that folder with numpy + onnxruntime only.
* :func:`preprocess_from_loader` / :func:`preprocess_from_model`: how images are prepared, as the
  policy records it; :func:`policy_from_eval`: the policy ``timm-l2w eval --q`` writes.

See docs/deploy.md.
"""
from .export import export_package
from .policy import model_name, policy_from_eval, preprocess_from_loader, preprocess_from_model

__all__ = ["export_package", "model_name", "policy_from_eval", "preprocess_from_loader", "preprocess_from_model"]
