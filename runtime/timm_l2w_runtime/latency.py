"""Latency tables: what every stage of an early-exit model costs on a target, and what a policy costs per image.

A latency table is a small JSON document (a policy file carries it under ``"latency"``), measured by
``timm_l2w.inference.measure_latency_table`` (PyTorch eager, CPU or GPU) or
:meth:`timm_l2w_runtime.EarlyExitRuntime.stage_latency` (onnxruntime). Keys:

* ``target`` (``"torch"`` or ``"onnxruntime"``) and ``device``: where it was measured (processor or GPU
  name, threads, provider, library versions).
* ``model``, ``num_exits``, ``input_size`` [C, H, W], ``rule``: what was timed (the exit rule's decision
  is part of every stage's time).
* ``batch_sizes``: the batch sizes measured, increasing.
* ``stage_ms[k][j]``: milliseconds of stage ``k`` on a batch of ``batch_sizes[j]`` images as the
  runtime's loop runs it: the stage, exit ``k``'s softmax and exit rule, the bookkeeping of who left
  (host syncs included: a GPU is synchronised at every stage, as the loop's decision does), timed in
  calls that run every stage (the deeper stages of the call before ran in between).
* ``stage_repeat_ms[k][j]``: the same when no stage deeper than ``k`` ran since stage ``k`` last ran
  (calls that all stop at exit ``k``): its weights may still be in the caches, which on a CPU at small
  batches makes it up to a quarter faster. The last stage's row is ``stage_ms``'s.
* ``gather_ms[k][j]``: milliseconds of cutting the state down to ``batch_sizes[j]`` rows before stage
  ``k``, paid only when some images left at exit ``k - 1`` (0 for stage 0).
* ``call_ms[j]``: the rest of one predict call (input checks, allocations).
* ``rounds``, ``repeats``, ``warmup``, ``clock``: every entry is timed in ``rounds`` rounds of ``repeats``
  calls, one round after another over the whole measurement (round ``r`` of every batch size and kind of
  call before round ``r + 1`` of any), on the ``"wall"`` clock (or ``"process"``: CPU time of the
  process, for measurements on a shared CPU); ``warmup`` untimed calls come before the first round, one
  before each later one. Each entry is the **slowest round's median**: the median ignores a single slow
  call, the slowest round covers the machine's drift while it was measured (a CPU shared with other
  work, a GPU's clocks), so the table errs towards the slower side and a budget chosen with it holds
  when the machine is as slow as it was seen to be.
* ``round_spread``: how much slower the slowest round's whole call (every stage, batch size by batch
  size) was than the fastest round's, the largest over the batch sizes: the drift seen while measuring.
  When the deployment machine can drift more than that, leave that much more headroom in the budget.

**Expected latency per image** of a policy at deployment batch size ``B`` (:func:`expected_latency_ms`):
with held-out exit fractions ``f_k``, an image reaches stage ``k`` with probability
``s_k = 1 - f_0 - ... - f_{k-1}``; in a batch of ``B`` independent images the number that reach it is
``N_k ~ Binomial(B, s_k)`` (``B s_k`` on average), and stage ``k`` runs only when ``N_k >= 1``::

    E[ms per image] = ( call(B) + sum_k sum_{n=1..B} [ P(N_k = n) T_k(n)
                                                      + P(N_k = n, N_{k-1} > n) g_k(n) ] ) / B
    P(N_k = n)            = C(B, n) s_k^n (1 - s_k)^(B - n)
    P(N_k = n = N_{k-1})  = C(B, n) s_k^n (1 - s_{k-1})^(B - n)     (nobody of the n left at exit k - 1)
    T_k(n)                = w_k r_k(n) + (1 - w_k) t_k(n),   w_k = (1 - s_{k+1})^B

``w_k`` is the chance that the batch before sent no image deeper than stage ``k``. ``t_k(n)``,
``r_k(n)`` and ``g_k(n)`` are the table's ``stage_ms``, ``stage_repeat_ms`` and ``gather_ms`` at ``n``
images: piecewise linear between the measured batch sizes, the smallest measured batch's time below it,
and a constant time per image above the largest. At ``B = 1``:
``call(1) + sum_k s_k (w_k r_k(1) + (1 - w_k) t_k(1))``. Every function here is vectorised over candidate
policies (rows of exit fractions). Needs numpy only.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "LATENCY_TARGETS", "CLOCKS", "TimingRule", "StageClock", "check_latency_table", "expected_latency_ms",
    "interpolate_ms", "latency_batch_sizes", "latency_table", "measure_stages", "processor_name",
    "read_latency_table", "latency_table_text", "check_timing_settings",
]

LATENCY_TARGETS = ("torch", "onnxruntime")
UNSTEADY_SPREAD = 0.10  # rounds further apart than this: the table's text says the machine was not steady
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
PathLike = Union[str, "os.PathLike[str]"]


def processor_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def latency_batch_sizes(batch_size: int) -> List[int]:
    """The batch sizes to measure for a deployment batch of ``batch_size``: powers of two below it, and it."""
    sizes, b = [], 1
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [int(batch_size)]


def _matrix(values: Any, rows: int, cols: int, where: str, error: type) -> List[List[float]]:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.zeros(0)
    if a.shape != (rows, cols) or not np.isfinite(a).all() or (a < 0).any():
        raise error(f"{where} must be {rows} x {cols} finite milliseconds >= 0 (one row per stage, one column per "
                    f"batch size), got {values!r:.200}")
    return a.tolist()


def check_latency_table(table: Any, num_exits: Optional[int] = None, where: str = "latency",
                        error: type = ValueError) -> Dict[str, Any]:
    """Validate a latency table (see the module docstring); return it normalised. ``num_exits``: the model's
    number of exits it must describe. Problems raise ``error`` naming ``where``."""
    if not isinstance(table, Mapping):
        raise error(f"{where} must be a latency table (a JSON object), got {type(table).__name__}: measure one "
                    "with timm_l2w.inference.measure_latency_table or timm-l2w-predict DIR --measure-latency")
    if table.get("target") not in LATENCY_TARGETS:
        raise error(f"{where}.target must be one of {LATENCY_TARGETS}, got {table.get('target')!r}")
    k = table.get("num_exits")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise error(f"{where}.num_exits must be an integer >= 1, got {k!r}")
    if num_exits is not None and k != num_exits:
        raise error(f"{where} times {k} stages but the model has {num_exits} exits: it was measured for another "
                    "model; measure the table for this one")
    sizes = table.get("batch_sizes")
    if (not isinstance(sizes, (list, tuple)) or not sizes
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)
            or any(b >= c for b, c in zip(sizes, sizes[1:]))):
        raise error(f"{where}.batch_sizes must be increasing integers >= 1, got {sizes!r}")
    cols = len(sizes)
    out = dict(table)
    out.update(num_exits=k, batch_sizes=list(sizes),
               stage_ms=_matrix(table.get("stage_ms"), k, cols, f"{where}.stage_ms", error),
               stage_repeat_ms=_matrix(table.get("stage_repeat_ms", table.get("stage_ms")), k, cols,
                                       f"{where}.stage_repeat_ms", error),
               gather_ms=_matrix(table.get("gather_ms", [[0.0] * cols] * k), k, cols, f"{where}.gather_ms", error),
               call_ms=_matrix([table.get("call_ms", [0.0] * cols)], 1, cols, f"{where}.call_ms", error)[0],
               device=dict(table.get("device") or {}))
    size = table.get("input_size")
    if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 3
                             or not all(isinstance(v, int) and v >= 1 for v in size)):
        raise error(f"{where}.input_size must be [channels, height, width] or null, got {size!r}")
    rounds, spread = table.get("rounds", 1), table.get("round_spread", 0.0)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise error(f"{where}.rounds must be an integer >= 1, got {rounds!r}")
    if (isinstance(spread, bool) or not isinstance(spread, (int, float)) or not np.isfinite(spread)
            or spread < 0):
        raise error(f"{where}.round_spread must be a finite number >= 0, got {spread!r}")
    out.update(rounds=rounds, round_spread=float(spread))
    return out


def read_latency_table(path: PathLike, num_exits: Optional[int] = None) -> Dict[str, Any]:
    """A latency table from a JSON file (``timm-l2w-predict DIR --measure-latency --latency-output FILE``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"latency table {path} does not exist: measure one with timm-l2w-predict DIR "
                         "--measure-latency --latency-output FILE on the target machine")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}): measure the latency table again") from None
    return check_latency_table(doc, num_exits, where=str(path))


def interpolate_ms(batch_sizes: Sequence[int], ms: Any, n: Any) -> np.ndarray:
    """Milliseconds at ``n`` images (``[M]``) from times measured at ``batch_sizes`` (``ms`` ``[..., S]``):
    piecewise linear between them, the smallest batch's time below it, constant per image above the largest.
    Returns ``[..., M]``."""
    x = np.asarray(batch_sizes, dtype=np.float64)
    y = np.asarray(ms, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    inside = np.clip(n, x[0], x[-1])
    j = np.clip(np.searchsorted(x, inside, side="right") - 1, 0, len(x) - 1)
    nxt = np.minimum(j + 1, len(x) - 1)
    span = np.where(nxt > j, x[nxt] - x[j], 1.0)
    w = (inside - x[j]) / span
    out = y[..., j] + w * (y[..., nxt] - y[..., j])
    return np.where(n > x[-1], y[..., -1:] * n / x[-1], out)


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x * log(y)``, 0 where ``x == 0`` (so ``0 * log 0 = 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x == 0, 0.0, x * np.log(np.where(x == 0, 1.0, y)))


def expected_latency_ms(table: Mapping[str, Any], exit_fractions: Any, batch_size: int = 1) -> np.ndarray:
    """Expected milliseconds per image of policies with ``exit_fractions`` (``[K]`` or ``[P, K]``: the share
    of images leaving at each exit) at deployment batch ``batch_size`` (the module docstring's formula);
    ``[]`` or ``[P]``."""
    table = check_latency_table(table)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (images per predict call), got {batch_size!r}")
    f = np.asarray(exit_fractions, dtype=np.float64)
    num_exits = table["num_exits"]
    if f.shape[-1:] != (num_exits,) or f.ndim > 2 or not np.isfinite(f).all():
        raise ValueError(f"exit_fractions must be [{num_exits}] or [P, {num_exits}] shares, got shape {f.shape}")
    reach = np.clip(1.0 - np.cumsum(f, axis=-1) + f, 0.0, 1.0)[..., :, None]  # s_k, [..., K, 1]
    before = np.concatenate([np.ones_like(reach[..., :1, :]), reach[..., :-1, :]], axis=-2)  # s_{k-1}
    b = int(batch_size)
    n = np.arange(1, b + 1, dtype=np.float64)
    log_choose = np.cumsum(np.log(b - n + 1) - np.log(n))  # log C(B, n)
    n_reach = log_choose + _xlogy(n, reach)  # log C(B, n) s_k^n
    p_run = np.exp(n_reach + _xlogy(b - n, 1.0 - reach))  # P(N_k = n)
    p_nobody_left = np.exp(n_reach + _xlogy(b - n, 1.0 - before))  # P(N_k = n = N_{k-1})
    p_gather = np.clip(p_run - p_nobody_left, 0.0, None)
    # the previous call ran no deeper than stage k: stage k's data may still be in the caches
    deeper = np.concatenate([reach[..., 1:, :], np.zeros_like(reach[..., :1, :])], axis=-2)  # s_{k+1}
    shallow = (1.0 - deeper) ** b  # w_k
    sizes = table["batch_sizes"]
    after_all = interpolate_ms(sizes, table["stage_ms"], n)  # [K, B]
    stage = shallow * interpolate_ms(sizes, table["stage_repeat_ms"], n) + (1.0 - shallow) * after_all
    gather = interpolate_ms(sizes, table["gather_ms"], n)
    call = float(interpolate_ms(sizes, table["call_ms"], [b])[0])
    per_batch = call + (p_run * stage).sum(axis=(-2, -1)) + (p_gather * gather).sum(axis=(-2, -1))
    return per_batch / b


class TimingRule:
    """The exit rule of a timed call: decides as ``rule`` does (the same work), then lets nobody leave
    (``leave_at = None``: every stage sees the whole batch) or everybody at exit ``leave_at``. Works on numpy
    arrays and torch tensors alike."""

    def __init__(self, rule: Any):
        self.rule, self.leave_at = rule, None

    def leave(self, k: int, logits: Any, conf: Any, pred: Any, params: Any, memory: Any = None):
        leave, memory = self.rule.leave(k, logits, conf, pred, params, memory)
        return (leave | True) if k == self.leave_at else (leave & False), memory

    def keep(self, memory: Any, rows: Any) -> Any:
        return self.rule.keep(memory, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rule, name)


class StageClock:
    """What a timed predict call records: the time each stage starts (:meth:`mark`, called as the stage is
    entered) and how long cutting down its state took (:meth:`gathered`). ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before every reading, so the device's work is done."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sync: Optional[Callable[[], Any]] = None):
        self.clock, self.sync = clock, sync
        self.marks: List[float] = []
        self.gathers: Dict[int, float] = {}

    def now(self) -> float:
        if self.sync is not None:
            self.sync()
        return self.clock()

    def mark(self) -> float:
        self.marks.append(self.now())
        return self.marks[-1]

    def gathered(self, k: int, start: float) -> None:
        self.gathers[k] = self.now() - start


def _timed_calls(predict: Callable[[Any], Any], x: Any, stage_clock: StageClock, stages: int,
                 repeats: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``repeats`` timed calls running ``stages`` stages: seconds per stage (gathers taken out), of the gathers,
    and of the call before the first stage; ``[repeats, stages]``, ``[repeats, stages]``, ``[repeats]``."""
    steps, gathers, calls = [], [], []
    for _ in range(repeats):
        stage_clock.marks, stage_clock.gathers = [], {}
        start = stage_clock.now()
        predict(x)
        marks = stage_clock.marks + [stage_clock.now()]
        if len(marks) != stages + 1:
            raise RuntimeError(f"the timed predict call ran {len(marks) - 1} stages, not {stages}")
        gather = np.array([stage_clock.gathers.get(k, 0.0) for k in range(stages)])
        steps.append(np.diff(marks) - gather)
        gathers.append(gather)
        calls.append(marks[0] - start)
    return np.asarray(steps), np.asarray(gathers), np.asarray(calls)


def measure_stages(predict: Callable[[Any], Any], make_input: Callable[[int], Any], stage_clock: StageClock,
                   timing_rule: TimingRule, batch_sizes: Sequence[int], num_exits: int, repeats: int,
                   warmup: int, rounds: int = 3) -> Dict[str, Any]:
    """Time a runtime's own predict loop, stage by stage, at every batch size (ms; the slowest of ``rounds``
    rounds' medians, with ``round_spread``: the module docstring).

    ``make_input(b)``: a batch of ``b`` images. ``predict(x)`` runs the loop with ``timing_rule`` as its exit
    rule; as each stage starts, its timed stand-in calls ``stage_clock.mark()`` and, for stages ``k >= 1``,
    cuts the state it received to all of its rows (a fresh copy, as the loop makes when samples left: the
    stage then reads it) and reports that with ``stage_clock.gathered(k, start)``. Calls with nobody leaving
    time every stage after the others ran (``stage_ms``, ``gather_ms``, ``call_ms``); calls with everybody
    leaving at exit ``k`` time stage ``k`` when no deeper stage ran in between (``stage_repeat_ms``).
    Every round runs every batch size and kind of call (``repeats`` timed calls after one untimed call, or
    after ``warmup`` in the first round) before the next round starts.
    """
    shape = (rounds, num_exits, len(batch_sizes))
    stage_ms, repeat_ms, gather_ms = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    call_ms = np.zeros((rounds, len(batch_sizes)))
    inputs = [make_input(int(b)) for b in batch_sizes]
    for r in range(rounds):
        for j, x in enumerate(inputs):
            for leave_at in [None, *range(num_exits - 1)]:
                timing_rule.leave_at = leave_at
                stages = num_exits if leave_at is None else leave_at + 1
                for _ in range(warmup if r == 0 else min(warmup, 1)):
                    predict(x)
                steps, gathers, calls = _timed_calls(predict, x, stage_clock, stages, repeats)
                if leave_at is None:
                    stage_ms[r, :, j] = np.median(steps, axis=0) * 1e3
                    gather_ms[r, :, j] = np.median(gathers, axis=0) * 1e3
                    call_ms[r, j] = np.median(calls) * 1e3
                else:
                    repeat_ms[r, leave_at, j] = np.median(steps[:, leave_at]) * 1e3
            timing_rule.leave_at = None
    repeat_ms[:, -1] = stage_ms[:, -1]  # the last stage always follows every other one
    whole_call = stage_ms.sum(axis=1) + gather_ms.sum(axis=1) + call_ms  # [rounds, S]
    spread = float((whole_call.max(axis=0) / np.maximum(whole_call.min(axis=0), 1e-12)).max() - 1.0)
    return {"batch_sizes": [int(b) for b in batch_sizes], "stage_ms": stage_ms.max(axis=0).tolist(),
            "stage_repeat_ms": repeat_ms.max(axis=0).tolist(), "gather_ms": gather_ms.max(axis=0).tolist(),
            "call_ms": call_ms.max(axis=0).tolist(), "rounds": int(rounds), "round_spread": spread}


def latency_table(target: str, device: Mapping[str, Any], model: Optional[str], num_exits: int,
                  input_size: Sequence[int], rule: str, timings: Mapping[str, Any], repeats: int, warmup: int,
                  clock: str) -> Dict[str, Any]:
    """The latency table document of ``timings`` (from :func:`measure_stages`), checked."""
    return check_latency_table({
        "target": target, "device": dict(device), "model": model, "num_exits": int(num_exits),
        "input_size": [int(v) for v in input_size], "rule": rule, **timings,
        "repeats": int(repeats), "warmup": int(warmup), "clock": clock,
    })


def check_timing_settings(repeats: Any, warmup: Any, clock: Any, batch_sizes: Any, rounds: Any = 1) -> List[int]:
    """Check a measurement's settings; return the batch sizes as a sorted list of unique integers."""
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("rounds", rounds, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {clock!r}")
    sizes = list(batch_sizes) if isinstance(batch_sizes, (list, tuple, range)) else [batch_sizes]
    if not sizes or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in sizes):
        raise ValueError(f"batch_sizes must be integers >= 1, got {batch_sizes!r}")
    return sorted({int(b) for b in sizes})


def latency_table_text(table: Mapping[str, Any]) -> str:
    """The table for a terminal: ms per batch of every stage at every batch size, and where it was measured."""
    sizes = table["batch_sizes"]
    device = ", ".join(f"{k} {v}" for k, v in table.get("device", {}).items())
    rounds = table.get("rounds", 1)
    timing = (f"slowest of {rounds} rounds' medians of {table.get('repeats')} runs, the rounds "
              f"{100 * table.get('round_spread', 0.0):.0f}% apart" if rounds > 1 else
              f"median of {table.get('repeats')} runs")
    lines = [f"latency table ({table['target']}; {device}; {timing}, {table.get('clock', 'wall')} clock), "
             "ms per batch (r: no deeper stage ran since):",
             "stage  " + "".join(f"{'batch ' + str(b):>12}" for b in sizes)]
    for k, row in enumerate(table["stage_ms"]):
        lines.append(f"{k + 1:>5}  " + "".join(f"{v:>12.4g}" for v in row))
    for k, row in enumerate(table.get("stage_repeat_ms", [])[:-1]):
        lines.append(f"{k + 1:>5}r " + "".join(f"{v:>12.4g}" for v in row))
    lines.append("gather " + "".join(f"{sum(col):>12.4g}" for col in zip(*table["gather_ms"])))
    lines.append("call   " + "".join(f"{v:>12.4g}" for v in table["call_ms"]))
    if table.get("round_spread", 0.0) > UNSTEADY_SPREAD:
        lines.append(f"note: the slowest round took {100 * table['round_spread']:.0f}% longer than the fastest: this "
                     "machine's speed moved while it was measured. The table holds the slowest round, so a budget "
                     "holds while the machine is no slower than that, at the price of a cheaper policy than a steady "
                     "machine would allow; measure again when the machine is quiet, with more --latency-rounds, or "
                     "on the deployment machine itself")
    return "\n".join(lines)
