"""How a task scores a model: one strategy for registered datasets, one for a user's function.

A :class:`Scorer` answers the three questions a search and an export ask of a model: the search's
score on search-val, given chunk by chunk so an early stop can end it (:meth:`Scorer.chunks`);
top-1 on search-val, by which a fine-tune keeps its best epoch (:meth:`Scorer.val_accuracy`);
and the held-out figure reports give (:meth:`Scorer.test_accuracy`). The task holds one and
never asks which kind it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from autoprune.data.datasets import Splits, TensorSplit
from autoprune.errors import AutopruneError
from autoprune.evaluate.metrics import PROXIES, accuracy, accuracy_on, log_probs, running_score

Score = Callable[[nn.Module], float]


class Scorer(ABC):
    """Scores models for a task; ``splits`` are the data a fine-tune trains on (None: none)."""

    splits: Splits | None = None

    @abstractmethod
    def chunks(self, model: nn.Module) -> Iterator[float]:
        """The search's score so far after each chunk of search-val; the last is the full score."""

    def score(self, model: nn.Module) -> float:
        """The search's score over all of search-val."""
        *_, last = self.chunks(model)
        return float(last)

    def score_on(self, model: nn.Module, images: int) -> float:
        """The search's proxy on ``images`` training images outside search-val and calibration
        (the same images for every model), for a final choice among close policies."""
        raise AutopruneError("scoring more images needs a registered dataset; with a score function, "
                             "the function is the only score")

    @abstractmethod
    def val_accuracy(self, model: nn.Module) -> float:
        """Top-1 on search-val whatever the proxy (what a fine-tune keeps its best epoch by)."""

    @property
    @abstractmethod
    def has_test(self) -> bool:
        """Whether there is a held-out figure to report."""

    @abstractmethod
    def test_accuracy(self, model: nn.Module) -> float:
        """The held-out figure (final reports only)."""


class SplitScorer(Scorer):
    """A registered dataset's splits: the proxy (``acc``, ``ce``, ``kl``) on search-val, scored a
    batch at a time, and top-1 on the test split.

    Args:
        splits: the protocol's splits.
        proxy: a name in :data:`~autoprune.evaluate.metrics.PROXIES`.
        dense: the dense model, whose outputs a proxy that needs them (``kl``) compares with.
        batch_size: images per evaluation batch (one chunk).
        device: where models are scored.
    """

    def __init__(self, splits: Splits, proxy: str, dense: nn.Module, batch_size: int, device: str) -> None:
        self.splits, self.proxy, self.batch_size, self.device = splits, proxy, batch_size, device
        self._dense, self._more = dense, None
        self.val, self.dense_logp = self._prepared(splits.search_val)

    def _prepared(self, split: TensorSplit) -> tuple[TensorSplit, torch.Tensor | None]:
        """``split`` on the scoring device, and the dense model's log-probabilities of it where the
        proxy compares with them."""
        if self.device != "cpu":
            split = type(split)(split.x.to(self.device), split.y)
        if not PROXIES.get(self.proxy).needs_dense:
            return split, None
        return split, log_probs(self._dense.to(self.device), split.batches(self.batch_size), self.device)

    def chunks(self, model):
        yield from running_score(model, self.val.batches(self.batch_size), self.proxy, self.device,
                                 self.dense_logp)

    def val_accuracy(self, model):
        return accuracy(model, self.val, self.batch_size, self.device)

    def score_on(self, model, images):
        if self.splits.more_images is None:
            return super().score_on(model, images)
        if self._more is None or self._more[0] != images:
            self._more = (images, *self._prepared(self.splits.more_images(images)))
        _, split, dense_logp = self._more
        *_, last = running_score(model, split.batches(self.batch_size), self.proxy, self.device, dense_logp)
        return float(last)

    @property
    def has_test(self):
        return True

    def test_accuracy(self, model):
        return accuracy_on(model.to(self.device), self.splits.test_loader(self.batch_size), self.device)


class FunctionScorer(Scorer):
    """A user's ``score(model) -> float`` (higher is better), run without gradients: it is the
    proxy, the search-val figure and one chunk; ``test_score``, if given, the held-out figure."""

    def __init__(self, score: Score, test_score: Score | None = None, device: str = "cpu") -> None:
        if not callable(score):
            raise AutopruneError("score must be a callable model -> float")
        self._score, self._test, self.device = _checked(score), test_score and _checked(test_score), device

    def chunks(self, model):
        yield self._score(model.eval())

    def val_accuracy(self, model):
        return self._score(model.eval())

    @property
    def has_test(self):
        return self._test is not None

    def test_accuracy(self, model):
        if self._test is None:
            raise AutopruneError("this task has no test split or test_score")
        return self._test(model.to(self.device).eval())


def _checked(score: Score) -> Score:
    """``score`` run without gradients, its result a finite float."""
    def run(model: nn.Module) -> float:
        with torch.no_grad():
            value = float(score(model))
        if not np.isfinite(value):
            raise AutopruneError(f"the score function returned {value} for a pruned model")
        return value

    return run
