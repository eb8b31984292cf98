"""The environment's settings, typed once: :class:`EnvConfig`.

The same frozen record is what the Python API and the command line build from their arguments
(by field name, :meth:`EnvConfig.split`), what :class:`~autoprune.envs.LayerSparsityEnv` reads,
and what a study stores under ``search.*`` (inside :class:`~autoprune.studies.records.SearchSpec`),
so that a worker process or ``--resume`` rebuilds the env the study was searched with. A new
setting is one field here, its use in the env, and its flag on the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from autoprune.common.records import Record, spec
from autoprune.cost.budget import Budget, parse_budgets, primary
from autoprune.cost.runtimes import RUNTIMES
from autoprune.envs.rewards import REWARDS
from autoprune.errors import AutopruneError


@dataclass(frozen=True)
class EnvConfig(Record):
    """How the env chooses and scores policies (stored as ``search.*``).

    Attributes:
        budget: ``0.5flops``, ``0.3params``, ``0.7latency``, ``2xflops``, ``50%flops``
            (:func:`~autoprune.cost.budget.parse_budget`), or several, one per metric and
            comma-separated (``0.5flops,0.75latency``): every episode meets them all.
        reward: a name in :data:`~autoprune.envs.rewards.REWARDS`; ``reward_lambda`` its penalty
            weight (``acc-penalty``).
        min_sparsity, max_sparsity: the range each unit's action is rescaled to.
        ranges: per-unit bounds, ``"PATTERN=LO:HI"`` or ``"PATTERN=V"`` (:mod:`autoprune.envs.space`).
        share: ``"PATTERN"`` or ``"stage"``: units that take one sparsity.
        latency_batch, latency_threads: what latency budgets are measured for.
        latency_runtime: what runs the model when its latency is measured, a name in
            :data:`~autoprune.cost.runtimes.RUNTIMES` (studies made before it existed measured
            ``eager``).
        latency_margin: under a latency budget the wall aims at ``budget / (1 + margin)``;
            ``None`` takes the latency table's fit error, 0 aims at the budget itself. A study
            records the margin the first run resolved (studies made before it existed: 0).
        latency_remeasure: measure a borderline episode's latency again with more pairs
            (:mod:`autoprune.envs.budget_check`; studies made before it existed measured once).
        latency_correct: from the third measured episode, aim the wall by the median of measured
            over predicted latency (studies made before it existed trusted the table).
        latency_refit: with ``latency_correct``, correct the table by fitting its coefficients
            again after each measured episode, on its calibration policies and every episode
            measured so far, in place of scaling it by that median. Off by default: it predicts
            the next episode closer, but with it two DDPG searches found worse policies (two TPE
            searches about as good; BENCHMARKS.md).
        latency_adapt: with ``latency_correct``, from the tenth measured episode the margin
            is how far over their median 9 in 10 of the ratios of measured to predicted latency
            ran (never more than the margin the study started with). Off by default: on a shared
            machine a few early episodes timed under load sized it too small, and the next
            episodes measured over the budget (BENCHMARKS.md).
        latency_fill: under a latency budget, widen each episode's finished policy into what it
            leaves below the wall's aim (:meth:`~autoprune.envs.wall.ActionWall.fill`); studies
            made before it existed played policies as the wall left them.
        latency_retry: under a latency budget, an episode whose measured latency runs over the
            budget beyond its tolerance is played once more, its requested sparsities as they
            were, with the wall aimed by that episode's own measured over predicted latency; the
            trial records the second play (and the first's figures under ``latency.over``).
            Studies made before it existed kept the first play.
        latency_pairs: alternated dense/pruned runs behind each episode's measured latency; more
            pairs cost time and cut the noise of the median (about 1 % sd at 30 on a shared CPU).
        width_grid: under the task's ``round_to="auto"``, the widths the env read from the
            latency table of ``latency_runtime`` at ``latency_batch`` (``auto:`` and a digest of
            them), resolved by the env and recorded; a resume or worker whose table gives other
            widths is refused. ``None`` for explicit multiples.
    """

    namespace: ClassVar[str] = "search"

    budget: str = spec("0.5flops", identity=True, sibling=True)
    reward: str = spec("acc", identity=True)
    reward_lambda: float = spec(1.0, identity=True)
    min_sparsity: float = spec(0.0, identity=True)
    max_sparsity: float = spec(0.8, identity=True)
    ranges: tuple[str, ...] = spec((), identity=True, legacy=())
    share: tuple[str, ...] = spec((), identity=True, legacy=())
    latency_batch: int = spec(1, identity=True, legacy=1)
    latency_threads: int | None = spec(None, legacy=None)
    latency_runtime: str = spec("eager", identity=True, legacy="eager")
    latency_margin: float | None = spec(None, legacy=0.0)
    latency_remeasure: bool = spec(True, legacy=False)
    latency_correct: bool = spec(True, legacy=False)
    latency_refit: bool = spec(False, legacy=False)
    latency_adapt: bool = spec(False, legacy=False)
    latency_fill: bool = spec(True, legacy=False)
    latency_retry: bool = spec(True, legacy=False)
    latency_pairs: int = spec(30, legacy=30)
    width_grid: str | None = spec(None, identity=True, legacy=None)

    def __post_init__(self) -> None:
        # tuples, whatever sequence was passed (a study stores lists)
        object.__setattr__(self, "ranges", tuple(self.ranges))
        object.__setattr__(self, "share", tuple(self.share))
        if isinstance(self.budget, Budget):
            object.__setattr__(self, "budget", str(self.budget))
        elif isinstance(self.budget, (list, tuple)):  # several: ["0.5flops", "0.75latency"]
            object.__setattr__(self, "budget", ",".join(str(b) for b in self.budget))

    @property
    def parsed_budgets(self) -> tuple[Budget, ...]:
        """Every budget, in the order given."""
        return parse_budgets(self.budget)

    @property
    def parsed_budget(self) -> Budget:
        """The primary budget (:func:`~autoprune.cost.budget.primary`): the latency one where
        there is one, else the only or first one."""
        return primary(self.parsed_budgets)

    def check(self) -> EnvConfig:
        """Refuse what can be refused without a model: a malformed budget, range or name, or a
        sparsity range outside [0, 1). One clear error before any data is read."""
        from autoprune.envs.space import parse_range

        self.parsed_budgets  # noqa: B018  (parses, or raises the budget's own message)
        REWARDS.get(self.reward)
        RUNTIMES.get(self.latency_runtime)
        for entry in self.ranges:  # the patterns are matched once the model is traced
            parse_range(entry)
        if not 0.0 <= self.min_sparsity <= self.max_sparsity < 1.0:
            raise AutopruneError(f"need 0 <= min_sparsity <= max_sparsity < 1, got "
                                 f"{self.min_sparsity:g} and {self.max_sparsity:g}")
        if self.latency_batch < 1:
            raise AutopruneError(f"latency_batch must be at least 1, got {self.latency_batch}")
        if self.latency_pairs < 3:
            raise AutopruneError(f"latency_pairs must be at least 3 (a median of pairs), got {self.latency_pairs}")
        return self

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def split(cls, settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``settings`` parted into the keys that are fields here, and the rest (for the task)."""
        names = cls.names()
        return ({k: v for k, v in settings.items() if k in names},
                {k: v for k, v in settings.items() if k not in names})
