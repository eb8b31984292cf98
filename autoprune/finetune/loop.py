"""Fine-tuning a pruned model back towards dense accuracy.

The recipe (:class:`FinetuneConfig`): SGD with Nesterov momentum, a short linear warm-up and a
cosine decay scaled to the run's length, the training split's augmentation (random crop and flip
for small images, see :mod:`autoprune.data.datasets`), and distillation from the dense model's logits.

A run given a folder (``run_dir``) is safe to make long:

* after every epoch it writes ``finetune-checkpoint.pt`` (model, optimiser, schedule, RNG,
  epoch, the best epoch so far) atomically, and ``finetune.csv``, one row per epoch: train loss,
  learning rate, held-out accuracy and, when asked, test accuracy;
* ``resume=True`` continues from the checkpoint where a killed run stopped. Each epoch's batch
  order and augmentation are seeded from ``(seed, epoch)``, so a resumed run ends with the same
  weights as one that was never interrupted;
* the model kept is the best trained epoch on the held-out split (``validate``), never on test.
  The model as it came is scored too (``val_before``) but does not compete: the held-out split is
  carved from the training images, which the dense model has fit, so a model that has not been
  trained away from the dense weights scores high there by memory. On ResNet-56 the refit model
  scored 97.4 % on it and 87.0 % on test; 21 epochs later, 97.5 % and 90.2 %.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autoprune.common.fileio import atomic_torch_save, atomic_write_text
from autoprune.data.datasets import Splits
from autoprune.errors import AutopruneError
from autoprune.finetune.teacher import TeacherLogits, default_folder

CHECKPOINT = "finetune-checkpoint.pt"
LOG = "finetune.csv"
LOG_FIELDS = ("epoch", "steps", "lr", "train_loss", "val_acc", "test_acc", "seconds")
_FORMAT = "autoprune.finetune.loop"


@dataclass(frozen=True)
class FinetuneConfig:
    """One recipe for every model fine-tuned by autoprune.

    Attributes:
        epochs: passes over the training split (ignored when ``steps`` is set).
        steps: exact number of optimiser steps instead of epochs (used per episode).
        lr: peak learning rate, reached after the warm-up; decays to 0 on a cosine.
        warmup: fraction of the steps spent rising linearly to ``lr``.
        momentum: SGD momentum (Nesterov).
        weight_decay: L2 weight decay (not on biases and norm parameters).
        batch_size: images per step.
        distill: weight of the KL term towards the dense teacher's logits (0 = cross-entropy only).
        temperature: distillation temperature.
        label_smoothing: label smoothing of the cross-entropy term.
        hint: weight of feature-map hints (FitNets): the mean squared error between the pruned
            model's outputs at the hint points (the units' BatchNorm layers) and the dense model's
            on the channels it kept. 0 = none; needs the dense model and the hint points.
        amp: mixed precision (bfloat16 autocast) on CUDA, and on CPUs that compute in bfloat16
            natively (AMX or AVX512-BF16; see :func:`native_bf16`); ignored on other CPUs.
        seed: seeds each epoch's batch order and augmentation.
        channels_last: the model and its batches in channels-last memory layout (what cuDNN's and
            oneDNN's fastest convolutions read), on the devices ``amp`` applies to.
        compile: train through ``torch.compile`` (minutes of compilation first; pays on long runs).
    """

    epochs: float = 1.0
    steps: int | None = None
    lr: float = 0.01
    warmup: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    distill: float = 0.0
    temperature: float = 4.0
    label_smoothing: float = 0.0
    hint: float = 0.0
    amp: bool = True
    seed: int = 0
    channels_last: bool = True
    compile: bool = False

    @classmethod
    def recipe(cls, epochs: float, **overrides) -> FinetuneConfig:
        """The recipe ``export`` and ``apply`` fine-tune with, for N = ``epochs`` (see BENCHMARKS.md for
        how its parts were chosen): distillation from the dense model's logits (weight 0.9, temperature
        4), a peak lr of 0.005 reached linearly over the first epoch (at most a tenth of the run),
        then a cosine to 0 at the end of epoch N. A refit pruned model sits where full-size steps
        from the first batch undo the refit (measured on ResNet-56: 25 steps at lr 0.01 take
        search-val from 97.4 % to 38-65 %; ramped to 0.005, to 84 %), so the peak is lower and
        reached slowly."""
        defaults = dict(epochs=epochs, lr=0.005, warmup=min(0.1, 1.0 / max(epochs, 1e-9)), distill=0.9,
                        temperature=4.0)
        return cls(**{**defaults, **overrides})

    def check(self) -> FinetuneConfig:
        if not self.epochs >= 0:
            raise AutopruneError(f"fine-tuning epochs is {self.epochs:g}; give 0 (no fine-tune) or more")
        if self.batch_size < 1 or (self.steps is not None and self.steps < 1) or self.lr <= 0:
            raise AutopruneError("fine-tuning needs a batch size and steps of at least 1 and a positive lr")
        if not (0 <= self.distill <= 1 and 0 <= self.label_smoothing < 1 and 0 <= self.warmup < 1):
            raise AutopruneError("fine-tuning: distill must be in [0, 1], label smoothing and warm-up in [0, 1)")
        if not (self.hint >= 0 and math.isfinite(self.hint)):
            raise AutopruneError("fine-tuning: the hint weight must be 0 or more")
        return self


@dataclass
class FinetuneResult:
    """What a fine-tune did: the model (in eval mode, the best epoch's weights when validated),
    one history row per epoch (:data:`LOG_FIELDS`), the epoch kept, its held-out accuracy and the
    held-out accuracy before training (both ``None`` without ``validate``), and the epoch it
    resumed after."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    val_acc: float | None = None
    val_before: float | None = None
    resumed_after: int = 0


def native_bf16(device: str) -> bool:
    """Whether training on ``device`` gains from bfloat16 autocast: on CUDA, and on CPUs with AMX
    tiles or AVX512-BF16, where oneDNN runs bfloat16 convolutions natively (measured on an AMX
    Xeon, one thread, a ResNet-56 training step: 2.3x with channels-last). Elsewhere a CPU emulates
    bfloat16, slower than float32."""
    if str(device).startswith("cuda"):
        return True
    if not str(device).startswith("cpu"):
        return False
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes)


def _loss(logits, y, teacher_logits, cfg: FinetuneConfig):
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is not None and cfg.distill > 0:
        t = cfg.temperature
        kd = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher_logits / t, 1),
                      reduction="batchmean") * t * t
        loss = (1 - cfg.distill) * loss + cfg.distill * kd
    return loss


class _Hints:
    """Forward hooks that catch the hint points' outputs in both models during a step."""

    def __init__(self, model: nn.Module, teacher: nn.Module, points: Mapping[str, torch.Tensor],
                 device: str) -> None:
        self.points = {name: idx.to(device) for name, idx in points.items()}
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in self.points:
            for net, caught in ((model, self.student), (teacher, self.teacher)):
                self.handles.append(net.get_submodule(name).register_forward_hook(self._catch(caught, name)))

    @staticmethod
    def _catch(caught: dict, name: str):
        def hook(module, inputs, output):
            caught[name] = output
        return hook

    def loss(self) -> torch.Tensor:
        """Mean over the points of the squared error on the kept channels (of this step's forwards)."""
        errors = [F.mse_loss(self.student[n].float(), self.teacher[n].index_select(1, idx).float())
                  for n, idx in self.points.items()]
        self.student.clear()
        self.teacher.clear()
        return torch.stack(errors).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _schedule(total: int, warmup: float) -> Callable[[int], float]:
    ramp = int(round(warmup * total))

    def factor(i: int) -> float:
        if i < ramp:
            return (i + 1) / ramp
        return 0.5 * (1 + math.cos(math.pi * (i - ramp) / max(1, total - ramp)))

    return factor


def _state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _write_log(run_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS})
    atomic_write_text(run_dir / LOG, buf.getvalue())


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).exists()


def _read_checkpoint(path: Path, cfg: FinetuneConfig, tag: dict) -> dict:
    from autoprune.model.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise AutopruneError(f"{path} is not an autoprune fine-tuning checkpoint")
    # checkpoints from before hints and memory layouts had none (the layout changes no result)
    saved = {"hint": 0.0, "channels_last": cfg.channels_last, **ckpt.get("config", {})}
    # whether the steps run through torch.compile changes how fast they run, not what they compute:
    # a run may resume with or without it (on a machine without a compiler, say)
    mine = {k: v for k, v in asdict(cfg).items() if k != "compile"}
    saved.pop("compile", None)
    if saved != mine:
        diff = sorted(k for k, v in mine.items() if saved.get(k) != v)
        raise AutopruneError(f"{path} was written by a fine-tune with other settings ({', '.join(diff)}); "
                             "resume with the same settings, or remove it to start again")
    if ckpt.get("tag") != tag:
        raise AutopruneError(f"{path} was written while fine-tuning another model or policy; "
                             "remove it to start again")
    return ckpt


def finetune(model: nn.Module, splits: Splits, cfg: FinetuneConfig = FinetuneConfig(),
             teacher: nn.Module | None = None, device: str = "cpu", progress: bool = True,
             desc: str = "fine-tune", run_dir: str | Path | None = None, resume: bool = False,
             validate: Callable[[nn.Module], float] | None = None,
             test: Callable[[nn.Module], float] | None = None, tag: dict | None = None,
             hints: Mapping[str, torch.Tensor] | None = None,
             teacher_cache: bool | str | Path = True) -> FinetuneResult:
    """Train ``model`` in place on ``splits.train`` (augmented) and return it in eval mode.

    Args:
        teacher: the dense model, for ``cfg.distill > 0``.
        run_dir: folder for the per-epoch checkpoint and the CSV log (none: neither is written).
        resume: continue from ``run_dir``'s checkpoint (its settings and ``tag`` must match).
        validate: ``model -> accuracy`` on a held-out split, before training (recorded) and after
            every epoch; the best epoch's weights are the ones returned.
        test: ``model -> accuracy`` on the test split, logged after every epoch, never used to choose.
        tag: what the checkpoint must have been made from (the policy, the dense weights).
        hints: for ``cfg.hint > 0``, module name -> the dense model's channel indices that
            module kept in ``model`` (:func:`autoprune.export.apply.hint_points`).
        teacher_cache: keep the teacher's logits for each batch and reuse those of an earlier run
            on the same batches (:mod:`autoprune.finetune.teacher`): ``True`` under the cache
            folder, a folder, or ``False`` (the teacher runs on every batch). It changes what a
            step costs, not what it computes.

    A non-finite loss stops training with a user error rather than writing a broken model.
    """
    cfg.check()
    run_dir = Path(run_dir) if run_dir is not None else None
    tag = dict(tag or {})
    ckpt_path = _open_run_dir(run_dir, resume)
    run = _Run(model, splits, cfg, teacher, device, hints, teacher_cache)
    if resume and ckpt_path is not None and ckpt_path.exists():
        run.restore(_read_checkpoint(ckpt_path, cfg, tag))
    elif validate is not None and cfg.steps is None:
        run.result.val_before = float(validate(model.eval()))
    bar = tqdm(total=run.total, initial=run.step, desc=desc, disable=not progress, unit="step", leave=False)
    try:
        while run.step < run.total:
            started = time.perf_counter()
            losses = run.train_epoch(bar)
            if cfg.steps is not None:  # a fixed number of steps (an episode's): no epoch bookkeeping
                continue
            row, state = run.end_epoch(losses, started, validate, test)
            if progress:
                bar.write(_epoch_line(desc, row))
            if run_dir is not None:
                _write_log(run_dir, run.result.history)
                atomic_torch_save(run.checkpoint(tag, state), ckpt_path)
    finally:
        bar.close()
        run.close()
    return run.finish()


def _open_run_dir(run_dir: Path | None, resume: bool) -> Path | None:
    """Make ``run_dir`` ready for a run and return where its checkpoint goes (``None``: no folder).
    A checkpoint left there is only ever continued, never overwritten."""
    if run_dir is None:
        return None
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise AutopruneError(f"{run_dir} holds the checkpoint of an interrupted fine-tune: resume "
                             f"it (resume=True), or remove {ckpt_path} to start again")
    run_dir.mkdir(parents=True, exist_ok=True)
    _sweep(run_dir)
    return ckpt_path


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on weights only, not on biases and norm parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
    )


def _epoch_line(desc: str, row: dict) -> str:
    return (f"{desc}: epoch {row['epoch']} loss {row['train_loss']:.4f}"
            + (f", held-out {row['val_acc']:.2%}" if row["val_acc"] is not None else "")
            + (f", test {row['test_acc']:.2%}" if row["test_acc"] is not None else ""))


class _Run:
    """One fine-tune's moving parts (optimiser, schedule, loader, hint hooks) and where it stands:
    the step, the epoch, the best epoch so far and the result being filled in."""

    def __init__(self, model: nn.Module, splits: Splits, cfg: FinetuneConfig, teacher: nn.Module | None,
                 device: str, hints: Mapping[str, torch.Tensor] | None, teacher_cache: bool | str | Path) -> None:
        self.model, self.cfg, self.teacher, self.device = model, cfg, teacher, device
        model.to(device).train()
        if teacher is not None:
            teacher.to(device).eval()
        self.distill = teacher is not None and cfg.distill > 0
        if cfg.hint > 0 and (teacher is None or not hints):
            raise AutopruneError("feature-map hints need the dense model and the hint points")
        self.opt = _optimizer(model, cfg)
        self.loader = splits.train_loader(min(cfg.batch_size, len(splits.train)), seed=cfg.seed, device=device)
        per_epoch = len(self.loader)
        if per_epoch == 0:
            raise AutopruneError("the training split is smaller than one batch; lower the fine-tune's batch_size")
        self.total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(self.total, cfg.warmup))
        fast = native_bf16(device)
        kind = torch.device(device).type
        amp = cfg.amp and fast  # bfloat16: no loss scaling needed
        self.autocast = (lambda: torch.autocast(kind, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        self.layout = torch.channels_last if cfg.channels_last and fast else torch.contiguous_format
        for m in (model, teacher):
            if m is not None and self.layout is torch.channels_last:
                m.to(memory_format=torch.channels_last)
        self.forward = torch.compile(model) if cfg.compile else model
        # hooked last, so that a setting refused above leaves no hooks on the caller's models
        self.hinted = _Hints(model, teacher, hints, device) if cfg.hint > 0 else None
        self.logits = None  # hints need the teacher's features on every batch, not only its logits
        if self.distill and self.hinted is None and teacher_cache is not False:
            folder = default_folder() if teacher_cache is True else Path(teacher_cache)
            self.logits = TeacherLogits.for_run(teacher, self.loader, seed=cfg.seed, amp=amp, layout=self.layout,
                                                device=device, folder=folder)
        self.result = FinetuneResult(model)
        self.step, self.epoch, self.best = 0, 0, None

    def restore(self, ckpt: dict) -> None:
        """Continue where the run that wrote ``ckpt`` stopped."""
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        self.step, self.epoch, self.best = int(ckpt["step"]), int(ckpt["epoch"]), ckpt["best"]
        self.result.history, self.result.val_before = list(ckpt["history"]), ckpt.get("val_before")
        self.result.resumed_after = self.epoch

    def train_epoch(self, bar) -> list[float]:
        """One pass over the training split (cut short at the last step); returns its losses."""
        cfg, model = self.cfg, self.model
        # everything random in an epoch follows from (seed, epoch): a resumed run repeats it
        torch.manual_seed(cfg.seed * 100_003 + self.epoch)
        self.loader.generator.manual_seed(cfg.seed + self.epoch)
        losses = []
        stored = self.logits.epoch(self.epoch) if self.logits is not None else None
        seen = []  # the teacher's logits for each batch, stored or computed, while there is a store to fill
        model.train()
        for i, (x, y) in enumerate(self.loader):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.layout)
            known = stored[i] if stored is not None and i < len(stored) else None
            if known is not None and i == 0 and not self.logits.verify(known, self._teacher(x)):
                stored = known = None
            loss, t_logits = self._train_step(x, y.to(self.device, non_blocking=True), known)
            if i == 0 and self.logits is not None and not self.logits.fits(t_logits, len(self.loader)):
                self.logits = None  # an epoch's logits too large to keep (many images, many classes)
            if self.logits is not None:
                seen.append(t_logits)
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(epoch=self.epoch + 1, loss=f"{loss:.3f}", refresh=False)
            if self.step >= self.total:
                break
        if self.logits is not None and len(seen) > (0 if stored is None else len(stored)):
            self.logits.store(self.epoch, seen)
        self.epoch += 1
        return losses

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast(), torch.no_grad():
            return self.teacher(x)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor,
                    t_logits: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None]:
        """One optimiser step; ``t_logits``: the teacher's logits for ``x`` where they are known.
        Returns the loss and the teacher's logits the step used."""
        cfg = self.cfg
        with self.autocast():
            if t_logits is not None:
                t_logits = t_logits.to(self.device, non_blocking=True)
            elif self.distill or self.hinted:
                with torch.no_grad():
                    t_logits = self.teacher(x)
            loss = _loss(self.forward(x).float(), y, t_logits.float() if self.distill else None, cfg)
            if self.hinted is not None:
                loss = loss + cfg.hint * self.hinted.loss()
        if not torch.isfinite(loss):
            raise AutopruneError(f"fine-tuning loss became {loss.item()} at step {self.step}; lower the "
                                 "learning rate (lr)")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step += 1
        return loss.item(), t_logits

    def end_epoch(self, losses: list[float], started: float, validate, test) -> tuple[dict, dict]:
        """Score the epoch just trained, log it and keep it if it is the best so far. Returns its
        history row and the model's weights (one copy, for the best epoch and the checkpoint alike)."""
        model = self.model.eval()
        row = {"epoch": self.epoch, "steps": self.step, "lr": self.opt.param_groups[0]["lr"],
               "train_loss": sum(losses) / len(losses),
               "val_acc": float(validate(model)) if validate is not None else None,
               "test_acc": float(test(model)) if test is not None else None,
               "seconds": round(time.perf_counter() - started, 2)}
        self.result.history.append(row)
        state = _state(model)
        if row["val_acc"] is not None and (self.best is None or row["val_acc"] > self.best["val_acc"]):
            self.best = {"epoch": self.epoch, "val_acc": row["val_acc"], "state": state}
        return row, state

    def checkpoint(self, tag: dict, state: dict) -> dict:
        """Everything a resumed run needs to end with the same weights as an uninterrupted one."""
        return {
            "format": _FORMAT, "config": asdict(self.cfg), "tag": tag, "epoch": self.epoch, "step": self.step,
            "model": state, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": torch.get_rng_state(), "best": self.best,
            "history": self.result.history, "val_before": self.result.val_before,
        }

    def close(self) -> None:
        if self.hinted is not None:
            self.hinted.remove()

    def finish(self) -> FinetuneResult:
        """Load the best epoch's weights (the last epoch's without validation); the model in eval mode."""
        result = self.result
        if self.best is not None:
            self.model.load_state_dict(self.best["state"])
            result.best_epoch, result.val_acc = self.best["epoch"], self.best["val_acc"]
        elif result.history:
            result.best_epoch = result.history[-1]["epoch"]
        for m in (self.model, self.teacher):  # the caller's models go back in the layout they came in
            if m is not None and self.layout is torch.channels_last:
                m.to(memory_format=torch.contiguous_format)
        self.model.eval()
        return result


def _sweep(run_dir: Path) -> None:
    """Remove what a kill in the middle of an atomic write left behind (never the checkpoint)."""
    for stale in run_dir.glob(f".{CHECKPOINT}.*.tmp"):
        stale.unlink(missing_ok=True)
    for stale in run_dir.glob(f".{LOG}.*.tmp"):
        stale.unlink(missing_ok=True)


def finished(run_dir: str | Path) -> None:
    """Remove a completed run's checkpoint (its weights are in the exported model; the CSV stays)."""
    (Path(run_dir) / CHECKPOINT).unlink(missing_ok=True)
    _sweep(Path(run_dir))

