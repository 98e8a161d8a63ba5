"""The training loop: ``train_one_epoch``, ``evaluate``, ``fit``, read top to bottom.

Tables are updated inside backward by their fused sparse optimizer; the dense rest of
the model by a torch optimizer over ``dense_param_groups(model)``.  Each table's
``extra_loss()`` is added to the loss and ``on_step_end(step)`` is called after it.

A non-finite loss stops training with :class:`NonFiniteLoss` naming the step, before
anything of that epoch is saved.  The best epoch is chosen by validation AUC, or by
validation logloss where the AUC is undefined (a validation split of one class).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rectables.memory import _collections, dense_param_groups, memory_report
from rectables.metrics import StreamingMetrics
from rectables.optim import OPTIMIZERS, SparseOptimizer
from rectables.runs import load_checkpoint, save_checkpoint, write_json, write_jsonl

_CHECK_EVERY = 32  # steps between checks of the loss (one host sync each)


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 4096
    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    sparse_eps: float = SparseOptimizer.eps  # the sparse optimizer's epsilon (Adagrad's and Adam's denominators)
    dense_lr: float = 1e-3
    seed: int = 0
    patience: int = 1  # epochs without val AUC gain before stopping
    max_steps_per_epoch: int = 0  # 0: the whole split
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.max_steps_per_epoch < 0:
            raise ValueError(f"epochs, batch_size, patience must be >= 1: {self}")
        if self.sparse_optimizer not in OPTIMIZERS:
            raise ValueError(f"sparse_optimizer must be one of {OPTIMIZERS}")
        if not (self.sparse_lr > 0 and self.dense_lr > 0):
            raise ValueError("learning rates must be > 0")
        if not self.sparse_eps > 0:
            raise ValueError(f"sparse_eps must be > 0, got {self.sparse_eps}")


def tables_extra_loss(model) -> torch.Tensor | float:
    """The sum of every table's ``extra_loss()`` in ``model`` (0.0 if none): every training
    loop adds it to its loss (OptEmbed's threshold term)."""
    extra = [x for c in _collections(model) if (x := c.extra_loss()) is not None]
    return sum(extra) if extra else 0.0


def tables_step_end(model, step: int) -> None:
    """Every table's ``on_step_end(step)``: every training loop calls it after its update."""
    for c in _collections(model):
        c.on_step_end(step)


def train_one_epoch(model, loader, dense_opt, cfg: TrainConfig, step: int = 0, label: str = "") -> tuple[int, dict]:
    """One pass over ``loader``; returns (global step, {loss, samples_per_s}).
    Raises :class:`NonFiniteLoss` if a step's loss is NaN or infinite."""
    model.train()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    total, n, t0 = torch.zeros((), dtype=torch.float64), 0, time.perf_counter()  # no host sync per step
    recent: list[torch.Tensor] = []  # losses since the last check
    bar = tqdm(loader, disable=not cfg.progress, leave=False, unit="batch", desc=label or None)
    for i, batch in enumerate(bar):
        if cfg.max_steps_per_epoch and i >= cfg.max_steps_per_epoch:
            break
        logits = model(batch.dense, batch.sparse)
        loss = loss_fn(logits, batch.labels) + tables_extra_loss(model)
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()  # fused sparse updates happen here
        dense_opt.step()
        step += 1
        tables_step_end(model, step)
        recent.append(loss.detach())
        if len(recent) == _CHECK_EVERY:
            _check_finite(recent, step)
            recent = []
        total += loss.detach() * len(batch.labels)
        n += len(batch.labels)
        if cfg.progress and i % 20 == 0:
            bar.set_postfix(loss=f"{float(total) / n:.4f}", samples_s=f"{n / (time.perf_counter() - t0):,.0f}")
    _check_finite(recent, step)
    seconds = time.perf_counter() - t0
    return step, {"loss": float(total) / max(n, 1), "samples_per_s": n / seconds, "seconds": seconds}


def _check_finite(losses: list[torch.Tensor], step: int) -> None:
    """Raise NonFiniteLoss naming the first bad step among the last len(losses) steps."""
    if not losses:
        return
    values = torch.stack(losses)
    ok = torch.isfinite(values)
    if bool(ok.all()):
        return
    first = int((~ok).nonzero()[0])
    raise NonFiniteLoss(
        f"the loss is {float(values[first])} at step {step - len(losses) + first + 1}; training stopped and nothing "
        f"of this epoch was saved. Lower the learning rates, or look for extreme values in the inputs")


@torch.no_grad()
def evaluate(model, loader) -> dict:
    """{auc, logloss, n} of ``model`` on every batch of ``loader``; with gauc where the
    batches carry groups (users)."""
    model.eval()
    m = StreamingMetrics()
    for batch in loader:
        m.update(model(batch.dense, batch.sparse), batch.labels, getattr(batch, "groups", None))
    return m.result()


def fit(model, train_loader, val_loader, cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
        label: str = "") -> dict:
    """Train with early stopping on validation AUC (logloss where the AUC is undefined);
    checkpoint every epoch; ``resume`` continues exactly from ``last.pt``.  ``label``
    (e.g. method, budget and seed) names the progress bar and the per-epoch lines."""
    run = Path(run_dir)
    ckpt, best_ckpt = run / "last.pt", run / "best.pt"
    dense_opt = torch.optim.Adam(dense_param_groups(model, cfg.dense_lr), lr=cfg.dense_lr, fused=True)  # one kernel: 0.4 vs 2.8 ms for DLRM
    state = {"epoch": 0, "step": 0, "best": None, "selected_by": "val_auc", "bad_epochs": 0, "history": []}
    if resume:
        state = load_checkpoint(ckpt, model, dense_opt)
    else:
        write_json(run / "memory.json", memory_report(model, dense_opt))
    write_jsonl(run / "metrics.jsonl", state["history"])  # drops records of epochs the checkpoint lacks
    _warn_if_few_steps(len(train_loader), cfg)
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        train_loader.set_epoch(state["epoch"])
        state["step"], tr = train_one_epoch(model, train_loader, dense_opt, cfg, state["step"],
                                            f"{label} epoch {state['epoch'] + 1}/{cfg.epochs}".strip())
        val = evaluate(model, val_loader)
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "step": state["step"], **tr, **{f"val_{k}": v for k, v in val.items()}}
        state["history"].append(record)
        write_jsonl(run / "metrics.jsonl", state["history"])
        if cfg.progress:
            tqdm.write(f"{label + ' ' if label else ''}epoch {state['epoch']}: train loss {tr['loss']:.4f}, val AUC {val['auc']:.4f}, "
                       f"val logloss {val['logloss']:.4f}, {tr['samples_per_s']:,.0f} samples/s")
        score = _selection_score(val, state)
        if state["best"] is None or score > state["best"]:
            state["best"], state["bad_epochs"] = score, 0
            save_checkpoint(best_ckpt, model, dense_opt, state)
        else:
            state["bad_epochs"] += 1
        save_checkpoint(ckpt, model, dense_opt, state)
    best = max(state["history"], key=lambda r: _score(r, state["selected_by"]))
    summary = {"config": asdict(cfg), "best_val_auc": best["val_auc"], "best_epoch": best["epoch"],
               "selected_by": state["selected_by"], "epochs": state["epoch"],
               "history": state["history"], "memory": memory_report(model, dense_opt)}
    write_json(run / "summary.json", summary)
    return summary


MIN_STEPS = 50  # fewer optimizer steps than this in all epochs together rarely trains a CTR model


def _warn_if_few_steps(steps_per_epoch: int, cfg: TrainConfig) -> None:
    steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps_per_epoch:
        steps = min(steps_per_epoch, cfg.max_steps_per_epoch) * cfg.epochs
    if steps < MIN_STEPS:
        rows = steps_per_epoch * cfg.batch_size
        batch = max(32, 1 << (rows * cfg.epochs // (4 * MIN_STEPS)).bit_length() - 1)
        epochs = -(-MIN_STEPS // max(1, steps // cfg.epochs))
        fix = (f"a smaller --batch-size (e.g. {batch:,}) or more --epochs" if batch < cfg.batch_size
               else f"more --epochs (e.g. {epochs})")
        warnings.warn(f"{cfg.epochs} epoch(s) of about {rows:,} training rows at batch size {cfg.batch_size} are only "
                      f"{steps} optimizer steps: the model will barely train. Use {fix}", RuntimeWarning,
                      stacklevel=3)


def _score(record: dict, selected_by: str) -> float:
    return record["val_auc"] if selected_by == "val_auc" else -record["val_logloss"]


def _selection_score(val: dict, state: dict) -> float:
    """Higher is better: validation AUC, or minus the logloss once the AUC is undefined."""
    if state["selected_by"] == "val_auc" and math.isnan(val["auc"]):
        state["selected_by"], state["best"] = "val_logloss", None
        warnings.warn("the validation split holds one class, so its AUC is undefined: the best epoch is "
                      "chosen by validation logloss", RuntimeWarning, stacklevel=3)
    return _score({f"val_{k}": v for k, v in val.items()}, state["selected_by"])
