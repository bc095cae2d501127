"""Seeded studies of L2W against equal weighting: run, summarize, plot.

- :mod:`timm_l2w.study.stats`: intervals over seeds (Student t, bootstrap) and the paired bootstrap over
  test images.
- :mod:`timm_l2w.study.weights`: what the weight predictor learns (weight against loss per exit, over
  the checkpoints of a run).
- :mod:`timm_l2w.study.runner`: the Fashion-MNIST fidelity study's runs (one training run per variant and
  seed, in child processes, resumable).
- :mod:`timm_l2w.study.summary`: the study's summary (every variant against equal weighting, as a dict);
  :mod:`timm_l2w.study.report` and :mod:`timm_l2w.study.plots`: its report files (JSON, Markdown, plots).
- :mod:`timm_l2w.study.verdict`: what a seeded comparison can tell (per-budget correctness, the verdict).

``timm-l2w demo`` uses the statistics, the verdict and the predictor analysis; ``benchmarks/fidelity.py`` is
the study's command line.
"""
