"""Run an exported timm_l2w early-exit model with numpy and onnxruntime only (no PyTorch).

``timm-l2w export`` writes a package folder (one ONNX graph per stage, ``manifest.json``,
``policy.json``); :class:`EarlyExitRuntime` loads it, prepares image files as the model expects and
runs per-sample early exit at any batch size::

    from timm_l2w_runtime import EarlyExitRuntime
    runtime = EarlyExitRuntime("exported/")
    files, result = runtime.predict_files(["cat.png", "dog.png"])
    result.predictions, result.confidences, result.exit_index
    out = runtime.predict_each_file(["images/"])   # every readable file; out.errors says why others were not
    table = runtime.stage_latency([1, 8, 64])      # ms per stage on this machine (timm_l2w_runtime.latency)

This package imports neither torch nor ``timm_l2w``; see docs/deploy.md for the package layout and
the loop a runtime in another language would write. It installs on its own (``pip install ./runtime``
from a clone of timm_l2w: numpy, onnxruntime and pillow) and gives the ``timm-l2w-predict`` command.
"""
from .images import find_images, preprocess_each, preprocess_files, preprocess_image, resize_bilinear, to_eight_bits
from .latency import check_latency_table, expected_latency_ms, read_latency_table
from .policy import PolicyError, PolicyWarning, check_policy, read_policy, write_policy
from .rules import EXIT_RULES, RULES, ExitRule, exit_confidence, exit_rule, predictive_entropy
from .runtime import EarlyExitRuntime, FilePredictions, PackageError, RuntimePrediction, read_manifest

__version__ = "0.1.0"  # runtime/pyproject.toml's, and timm_l2w's (they move together)

__all__ = [
    "EarlyExitRuntime", "RuntimePrediction", "FilePredictions", "PackageError", "PolicyError", "PolicyWarning",
    "read_manifest",
    "read_policy", "write_policy", "check_policy", "exit_confidence", "predictive_entropy", "preprocess_files",
    "preprocess_image", "preprocess_each", "to_eight_bits", "resize_bilinear", "find_images", "ExitRule", "RULES",
    "EXIT_RULES", "exit_rule", "expected_latency_ms", "check_latency_table", "read_latency_table",
]
