"""What the L2W weight predictor learns: a sample's weight against its loss, per exit, over training.

:func:`weight_loss_stats` applies one predictor to one set of exit losses; :func:`weights_over_training`
does it for every checkpoint of a run (each checkpoint's predictor on that checkpoint's own exit
losses); :func:`predictor_summary` aggregates the runs of several seeds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["weight_loss_stats", "weights_over_training", "predictor_summary"]


def weight_loss_stats(weights: Tensor, losses: Tensor, bins: int = 5) -> Dict[str, Any]:
    """Per exit of ``[N, K]`` weights and losses: mean / std of the weight, mean loss, the Pearson correlation
    of loss and weight, and the mean weight in ``bins`` loss quantiles (``loss_bins`` / ``weight_bins``, [K][bins])."""
    w, loss = weights.double(), losses.double()
    a, b = loss - loss.mean(0), w - w.mean(0)
    denom = a.norm(dim=0) * b.norm(dim=0)
    corr = torch.where(denom > 0, (a * b).sum(0) / denom.clamp_min(1e-300), torch.full_like(denom, float("nan")))
    order = loss.argsort(dim=0)  # [N, K]: samples by loss, per exit
    chunks = torch.tensor_split(torch.arange(loss.shape[0]), bins)
    loss_bins = [[float(loss[order[c, k], k].mean()) for c in chunks if len(c)] for k in range(loss.shape[1])]
    weight_bins = [[float(w[order[c, k], k].mean()) for c in chunks if len(c)] for k in range(loss.shape[1])]
    return {"weight_mean": w.mean(0).tolist(), "weight_std": w.std(0).tolist(), "loss_mean": loss.mean(0).tolist(),
            "corr_loss_weight": corr.tolist(), "weight_min": float(w.min()), "weight_max": float(w.max()),
            "loss_bins": loss_bins, "weight_bins": weight_bins}


def _model_from_file(path: Path) -> torch.nn.Module:
    """The multi-exit model a ``timm-l2w train`` weights file records (name, model_kwargs, classes), loaded."""
    import timm

    import timm_l2w.models  # noqa: F401  (registers the models)
    from timm_l2w.files import load_state_dict, read_metadata

    meta = read_metadata(path)
    if "model" not in meta:
        raise ValueError(f"{path} records no model name: pass a checkpoint written by timm-l2w train")
    kwargs = json.loads(meta.get("model_kwargs") or "{}")
    model = timm.create_model(meta["model"], num_classes=int(meta["num_classes"]), **kwargs)
    model.load_state_dict(load_state_dict(path))
    return model


def weights_over_training(run_dir: Path | str, held_loader: Iterable, eps: float, constraint: str,
                          input_type: str = "loss", bins: int = 5) -> List[Dict[str, Any]]:
    """For every complete checkpoint of an L2W run (``run_dir/checkpoints/step_*``): its predictor's weights
    on its own exit losses over ``held_loader`` (model in eval mode), as :func:`weight_loss_stats` rows
    with the checkpoint's ``step``."""
    from timm_l2w.evaluation import collect_exit_outputs
    from timm_l2w.files import load_state_dict
    from timm_l2w.weighting import WeightPredictor, sample_weights

    rows = []
    for ckpt in sorted((Path(run_dir) / "checkpoints").glob("step_*")):
        if not (ckpt / "COMPLETE").is_file():
            continue
        model = _model_from_file(ckpt / "model.safetensors")
        net = WeightPredictor.from_state_dict(load_state_dict(ckpt / "weight_predictor.safetensors"),
                                              input_type=input_type)
        out = collect_exit_outputs(model, held_loader)
        with torch.no_grad():
            w = sample_weights(net, out.losses.float(), eps=eps, constraint=constraint)
        rows.append({"step": int(ckpt.name.split("_")[1]), **weight_loss_stats(w, out.losses.float(), bins)})
    return rows


def _num(value: Any) -> float:
    """A number from a result file (non-finite floats are stored as strings)."""
    return float(value) if value is not None else float("nan")


def predictor_summary(runs: Dict[int, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Weight vs loss correlation per exit from each run's ``weights_over_training``.

    End of training: each seed's last checkpoint (mean, min, max over seeds of the correlation; mean
    weight per exit; ``seeds_positive``: how many seeds end with a positive correlation, per exit).
    Trajectory: the seed-mean correlation at every checkpoint step all seeds have, and per exit the
    first step from which that mean keeps the sign it ends with.
    """
    rows = {s: r["weights_over_training"] for s, r in runs.items() if r.get("weights_over_training")}
    if not rows:
        return None
    last = {s: w[-1] for s, w in rows.items()}
    corr_end = np.array([[_num(c) for c in last[s]["corr_loss_weight"]] for s in sorted(last)])
    weight_end = np.array([[_num(c) for c in last[s]["weight_mean"]] for s in sorted(last)])
    steps = sorted(set.intersection(*[{row["step"] for row in w} for w in rows.values()]))
    traj = np.array([[[_num(c) for c in next(row for row in rows[s] if row["step"] == step)["corr_loss_weight"]]
                      for step in steps] for s in sorted(rows)])  # seeds x steps x exits
    traj_mean = np.nanmean(traj, axis=0) if steps else np.zeros((0, corr_end.shape[1]))
    settled = []
    for k in range(traj_mean.shape[1]):
        sign = np.sign(traj_mean[-1, k]) if steps else 0.0
        differs = np.nonzero(np.sign(traj_mean[:, k]) != sign)[0]  # steps with another sign (or nan)
        idx = int(differs[-1]) + 1 if differs.size else 0
        settled.append(steps[idx] if steps and sign != 0 and idx < len(steps) else None)
    return {
        "seeds": sorted(rows),
        "end_step": {s: last[s]["step"] for s in sorted(last)},
        "corr_end": {"mean": np.nanmean(corr_end, 0).tolist(), "min": np.nanmin(corr_end, 0).tolist(),
                     "max": np.nanmax(corr_end, 0).tolist()},
        "seeds_positive": (corr_end > 0).sum(0).tolist(),
        "weight_mean_end": np.nanmean(weight_end, 0).tolist(),
        "weight_range_end": [min(_num(last[s]["weight_min"]) for s in last),
                             max(_num(last[s]["weight_max"]) for s in last)],
        "steps": steps,
        "corr_mean_over_steps": traj_mean.tolist(),
        "corr_over_steps_per_seed": traj.tolist(),
        "sign_settled_from_step": settled,
    }
