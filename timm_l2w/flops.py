"""Per-exit FLOPs in the convention of the paper's curves.

Counted on one image: multiply-accumulates of convolution and linear layers (a linear layer's bias
adds one op per output), one op per ReLU output element, and one op per pooled input-window element
(AdaptiveAvgPool2d: one per input element). Cumulative to each exit, heads of earlier exits included.
Other module types contribute through :data:`MODULE_FLOP_COUNTERS`, which backbones may extend
(e.g. attention matmuls of transformer blocks).

Models that set ``flop_counting = "aten"`` (:class:`timm_l2w.MultiExitWrapper`: any timm backbone)
are counted on the ops each stage really runs, with torch's ``FlopCounterMode``: its matmul,
convolution and attention (``scaled_dot_product_attention``) formulas, halved to multiply-accumulates,
plus the same convention for what it does not count: linear biases (one op per output), ReLU (one per
output element) and pooling (max/average pool windows, adaptive pools and spatial or token means:
one per input element). Normalisation, other activations and additions count zero, as above. For a
ResNet the two counters agree exactly; MSDNet and RANet keep the hook counter (the release's numbers).

FLOPs depend on the image size, so :func:`exit_flops` returns an :class:`ExitFlops` list that
remembers the size it was counted at; budgeted evaluation refuses outputs collected at another size
instead of giving a curve that is off by the ratio of the image areas.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple, Type

import torch
from timm.models import get_model_input_config
from torch import Tensor, nn

from .models.base import unwrap_model

__all__ = ["exit_flops", "ExitFlops", "MODULE_FLOP_COUNTERS", "register_flop_counter", "count_flops"]

FlopCounter = Callable[[nn.Module, Tuple[Tensor, ...], Tensor], float]


class ExitFlops(list):
    """Cumulative FLOPs per exit (a plain list of floats) and the ``input_size`` (C, H, W) they were counted at."""

    def __init__(self, flops: Sequence[float], input_size: Sequence[int]):
        super().__init__(float(f) for f in flops)
        self.input_size = tuple(int(v) for v in input_size)

    def __repr__(self) -> str:
        return f"ExitFlops({list(self)!r}, input_size={self.input_size})"


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_flops(m: nn.Conv2d, inputs, out: Tensor) -> float:
    kh, kw = _pair(m.kernel_size)
    return out.numel() * (m.in_channels // m.groups) * kh * kw


def _linear_flops(m: nn.Linear, inputs, out: Tensor) -> float:
    rows = out.numel() // m.out_features
    return rows * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))


def _relu_flops(m: nn.Module, inputs, out: Tensor) -> float:
    return out.numel()


def _pool_flops(m: nn.Module, inputs, out: Tensor) -> float:
    kh, kw = _pair(m.kernel_size)
    return out.numel() * kh * kw


def _adaptive_pool_flops(m: nn.Module, inputs, out: Tensor) -> float:
    return inputs[0].numel()


MODULE_FLOP_COUNTERS: Dict[Type[nn.Module], FlopCounter] = {
    nn.Conv2d: _conv_flops,
    nn.Linear: _linear_flops,
    nn.ReLU: _relu_flops,
    nn.MaxPool2d: _pool_flops,
    nn.AvgPool2d: _pool_flops,
    nn.AdaptiveAvgPool2d: _adaptive_pool_flops,
}


def register_flop_counter(module_type: Type[nn.Module], counter: FlopCounter) -> None:
    """Count ``module_type`` with ``counter(module, inputs, output) -> ops`` (batch of one)."""
    MODULE_FLOP_COUNTERS[module_type] = counter


def _counter_for(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in MODULE_FLOP_COUNTERS:
            return MODULE_FLOP_COUNTERS[cls]
    return None


@torch.no_grad()
def exit_flops(model: nn.Module, input_size: Sequence[int] | None = None) -> ExitFlops:
    """Cumulative FLOPs of each exit of a multi-exit model for one image of ``input_size`` (C, H, W).

    Works for any model meeting the multi-exit contract (``num_exits`` and ``forward_stage``).
    ``input_size`` defaults to the model's configured size (timm's current ``img_size`` / ``in_chans``,
    else ``pretrained_cfg['input_size']``); pass the size of
    the images you evaluate when it differs (``exit_flops(model, test.input_size)`` with ``test`` from
    :func:`timm_l2w.collect_exit_outputs`). The result remembers its size, and
    :func:`timm_l2w.budgeted_evaluation` / :func:`timm_l2w.anytime_metrics` raise a ``ValueError`` for
    outputs collected at another size.
    """
    model = unwrap_model(model)
    if not hasattr(model, "forward_stage") or not hasattr(model, "num_exits"):
        raise TypeError(
            f"{type(model).__name__} does not follow the multi-exit contract "
            "(needs num_exits and forward_stage): use a timm_l2w model"
        )
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" not in cfg:
            raise ValueError("pass input_size=(C, H, W): the model has no pretrained_cfg['input_size']")
        input_size = get_model_input_config(model)["input_size"]  # e.g. a ViT created with img_size=32
    if isinstance(input_size, int) or len(input_size) != 3:
        shown = input_size if isinstance(input_size, int) else tuple(input_size)
        raise ValueError(f"input_size must be (channels, height, width), got {shown}")

    if getattr(model, "flop_counting", None) == "aten":
        return ExitFlops(_aten_stage_flops(model, input_size), input_size)
    total = [0.0]

    def hook(module, inputs, output):
        counter = _counter_for(module)
        if counter is not None and isinstance(output, Tensor):
            total[0] += float(counter(module, inputs, output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if _counter_for(m) is not None]
    try:
        flops = _stage_totals(model, input_size, lambda: total[0])
    finally:
        for h in handles:
            h.remove()
    return ExitFlops(flops, input_size)


# ----------------------------------------------------------------------------- FlopCounterMode (any timm model)
# FlopCounterMode counts 2 FLOPs per multiply-accumulate; the total is halved, so the entries added here
# count 2 per paper op.


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _first_shape(out_shape: Any) -> Sequence[int]:
    nested = isinstance(out_shape, (tuple, list)) and out_shape and isinstance(out_shape[0], (tuple, list, torch.Size))
    return out_shape[0] if nested else out_shape


def _addmm_with_bias(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1] + 2 * _numel(out_shape)


def _per_output(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(_first_shape(out_shape))


def _per_input(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(x_shape)


def _pool_window(x_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    one = isinstance(kernel_size, (list, tuple)) and len(kernel_size) <= 1
    kh, kw = _pair(kernel_size[0] if one else kernel_size)
    return 2 * _numel(_first_shape(out_shape)) * kh * kw


def _spatial_mean(x_shape, dim=None, *args, out_shape=None, **kwargs) -> int:
    """Means over the spatial dims of a 4-d map or the tokens of a 3-d sequence are pooling; others count 0."""
    if dim is None:
        return 0
    dims = {d % len(x_shape) for d in ([dim] if isinstance(dim, int) else dim)}
    pooling = (len(x_shape) == 4 and dims in ({2, 3}, {1, 2})) or (len(x_shape) == 3 and dims == {1})
    return 2 * _numel(x_shape) if pooling else 0


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _paper_mapping() -> Dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    mapping = {
        aten.addmm: _addmm_with_bias,
        aten.relu: _per_output, aten.relu_: _per_output,
        aten.max_pool2d: _pool_window, aten.max_pool2d_with_indices: _pool_window, aten.avg_pool2d: _pool_window,
        aten._adaptive_avg_pool2d: _per_input, aten.adaptive_max_pool2d: _per_input, aten.mean: _spatial_mean,
    }
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):  # not in torch's own table
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu
    return mapping


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """FLOPs of ``fn(*args, **kwargs)`` as it really runs (any batch), in :func:`exit_flops`' convention for
    ``flop_counting = "aten"`` models: e.g. ``count_flops(predictor.predict, x)`` is what early exit spent."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_paper_mapping()) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() / 2


def _aten_stage_flops(model: nn.Module, input_size: Sequence[int]) -> List[float]:
    """Cumulative paper-convention FLOPs after each stage, counted by FlopCounterMode on one image."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models.fx_trace import fake_tensors

    try:  # shapes are all the formulas need: fake tensors skip the compute (big backbones, large images)
        with fake_tensors(model), FlopCounterMode(display=False, custom_mapping=_paper_mapping()) as counter:
            return _stage_totals(model, input_size, lambda: counter.get_total_flops() / 2)
    except Exception:  # noqa: BLE001 - an op without a fake kernel (data-dependent shapes): count for real
        with FlopCounterMode(display=False, custom_mapping=_paper_mapping()) as counter:
            return _stage_totals(model, input_size, lambda: counter.get_total_flops() / 2)


def _stage_totals(model: nn.Module, input_size: Sequence[int], total: Callable[[], float]) -> List[float]:
    """Run every stage on one zero image in eval mode; ``total()`` after each stage."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        state = torch.zeros(1, *input_size, device=device, dtype=dtype)
        if hasattr(model, "check_input"):
            model.check_input(state)
        flops = []
        with torch.no_grad():
            for k in range(model.num_exits):
                state, _ = model.forward_stage(k, state)
                flops.append(float(total()))
    finally:
        model.train(was_training)
    return flops
