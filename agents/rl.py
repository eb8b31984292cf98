"""Reinforcement-learning searchers: AMC's DDPG on stable-baselines3, and TD3/SAC variants.

stable-baselines3 owns the networks, the replay buffer and the gradient updates; this module
supplies AMC's episode logic around them (He et al., ECCV 2018, and mit-han-lab/amc):

* warm-up episodes with no updates (AMC used 100; here ``min(100, episodes // 4)``, at least 5,
  unless ``warmup`` is given): the first play the one-shot rules of the portfolio
  (:func:`~autoprune.agents.baselines.portfolio`), so the replay buffer starts with good policies
  and the study holds them, and under a latency budget the best of them again, at the aim the
  measurements left and a little below it, as the samplers play them; the rest uniformly random
  actions; the replay buffer keeps the last 2,000 episodes' transitions;
* exploration by a truncated normal around the actor's action, sigma 0.5 of the sparsity range,
  decaying by x0.95 per episode after warm-up (SAC explores with its own stochastic policy);
* the episode's final reward given to every step of the episode, stored in the replay buffer;
  sampled rewards have a moving-average baseline subtracted (:class:`BaselineReplayBuffer`);
* discount 1, actor and critic 300-300, learning rates 1e-4 (actor) / 1e-3 (critic), tau 0.01,
  batch 64, one gradient step per transition after warm-up.

Where stable-baselines3 needed extending: it applies one learning rate to every optimiser, so
``_update_learning_rate`` is overridden to give the actor and the critic their own; and the
baseline is subtracted in the replay buffer's ``sample``. The agent's state (networks, optimisers,
replay buffer, noise and random states, episode counter) is saved after every episode as tensors
and plain data, loadable with ``weights_only=True``.

stable-baselines3 is used through its public API (``get_parameters``/``set_parameters``,
``train``, ``predict``, ``set_logger``, the replay buffer's ``add`` and arrays) except in two
places where it has none, each marked in the code: the ``_update_learning_rate`` hook above, and
the ``_n_updates`` counter, which TD3's delayed actor updates follow and a resumed agent must
continue.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import torch
from stable_baselines3 import DDPG, SAC, TD3
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.logger import configure

from autoprune.agents.base import SEARCHERS, Episode, Searcher
from autoprune.common.fileio import atomic_torch_save
from autoprune.envs import LayerSparsityEnv, Stop
from autoprune.errors import AutopruneError

STATE_FILE = "agent.pt"


class BaselineReplayBuffer(ReplayBuffer):
    """A replay buffer whose sampled rewards have a moving-average baseline subtracted (AMC).

    The baseline follows the mean reward of each sampled batch:
    ``b <- b + alpha * (mean(batch) - b)``.
    """

    def __init__(self, *args, baseline_alpha: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.baseline_alpha = baseline_alpha
        self.baseline: float | None = None

    def sample(self, batch_size: int, env=None):
        data = super().sample(batch_size, env)
        mean = float(data.rewards.mean())
        self.baseline = mean if self.baseline is None else \
            self.baseline + self.baseline_alpha * (mean - self.baseline)
        return data._replace(rewards=data.rewards - self.baseline)


class _SplitLearningRates:
    """Mixin: the actor and the critic each get their own learning rate (AMC: 1e-4 / 1e-3)."""

    actor_lr: float = 1e-4
    critic_lr: float = 1e-3

    # A protected hook: stable-baselines3 has no public way to give each optimiser its own rate.
    def _update_learning_rate(self, optimizers) -> None:
        super()._update_learning_rate(optimizers)  # logs, and sets the schedule's rate everywhere
        for opt, lr in ((self.actor.optimizer, self.actor_lr), (self.critic.optimizer, self.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = lr


class AMCDDPG(_SplitLearningRates, DDPG):
    """DDPG with AMC's split learning rates."""


class AMCTD3(_SplitLearningRates, TD3):
    """TD3 (twin critics, delayed and smoothed targets) with AMC's split learning rates."""


class AMCSAC(_SplitLearningRates, SAC):
    """SAC with AMC's split learning rates; it explores through its own stochastic policy."""


class RLSearcher(Searcher):
    """An off-policy agent that picks each unit's sparsity in turn (see module docstring).

    Options (keyword arguments): ``warmup`` episodes, ``sigma`` (initial exploration, fraction of
    the sparsity range), ``sigma_decay``, ``buffer_size``, ``batch_size``.
    """

    uses_trial = False
    algo: type = AMCDDPG
    explore_with_noise = True
    # Tensors of the algorithm that get_parameters() leaves out (it returns state_dicts only).
    tensors: tuple[str, ...] = ()

    def setup(self, env: LayerSparsityEnv, study: optuna.Study, episodes: int) -> None:
        opts = self.options
        warmup = opts.get("warmup")
        self.warmup = int(warmup) if warmup is not None else min(100, max(5, episodes // 4))
        self.sigma0 = float(opts.get("sigma", 0.5))
        self.sigma_decay = float(opts.get("sigma_decay", 0.95))
        self.batch_size = int(opts.get("batch_size", 64))
        # A fixed size, not one that follows --episodes: a resumed search may ask for more episodes
        buffer = int(opts.get("buffer_size", env.n_units * 2000))
        self.study_uid = study.user_attrs.get("study_uid")
        kwargs = dict(
            learning_rate=1e-3, buffer_size=buffer, learning_starts=0, batch_size=self.batch_size,
            tau=0.01, gamma=1.0, replay_buffer_class=BaselineReplayBuffer,
            policy_kwargs={"net_arch": {"pi": [300, 300], "qf": [300, 300]}},
            seed=self.seed, device="cpu", verbose=0,
        )
        self.model = self.algo("MlpPolicy", env, **kwargs)
        self.model.set_logger(configure(None, []))  # driven by hand: no learn(), no log files
        from autoprune.agents.baselines import portfolio

        self.portfolio = portfolio(env)  # the first warm-up episodes play the one-shot rules
        # then rules played again: (rule, fraction of the aim, requested sparsities, scale; None in
        # a state saved before replays had one)
        self.replays: list[tuple[str, float, np.ndarray, float | None]] = []
        # the agent's own best episode to play again at its own measured ratio: (requested
        # sparsities, scale, its trial's number), or None (:func:`best_own_replay`)
        self.refill: tuple[np.ndarray, float, int] | None = None
        self.episodes = episodes
        self.episode_index = 0
        self.rng = np.random.default_rng(self.seed)

    # -- acting -----------------------------------------------------------------------------------
    @property
    def sigma(self) -> float:
        """Exploration sigma in action units ([-1, 1] spans the sparsity range, hence x2)."""
        return 2.0 * self.sigma0 * self.sigma_decay ** max(0, self.episode_index - self.warmup)

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.episode_index < self.warmup:
            return self.rng.uniform(-1.0, 1.0, size=(1,)).astype(np.float32)
        if not self.explore_with_noise:
            action, _ = self.model.predict(obs, deterministic=False)
            return np.asarray(action, dtype=np.float32).reshape(1)
        mu, _ = self.model.predict(obs, deterministic=True)
        return np.array([self._truncated_normal(float(np.asarray(mu).reshape(-1)[0]))], np.float32)

    def _truncated_normal(self, mu: float) -> float:
        """A draw of N(mu, sigma) truncated to [-1, 1], by rejection. The actor's mu lies in [-1, 1],
        so at least about half of the draws land inside; scipy's ``truncnorm.rvs`` cost ~4.5 ms a
        step, a third of a small DDPG search."""
        mu = min(max(mu, -1.0), 1.0)
        for _ in range(64):
            x = self.rng.normal(mu, self.sigma)
            if -1.0 <= x <= 1.0:
                return float(x)
        return mu  # (0.52 ** 64: never, in practice)

    def episode(self, env: LayerSparsityEnv, trial: optuna.Trial, stop: Stop | None = None) -> Episode:
        obs, _ = env.reset()
        steps, requested, info, reward, done = [], [], {}, 0.0, False
        rule, plan, scale = self._plan(trial)
        with env.aimed_by(scale):  # a rule played again at its own measured ratio
            while not done:
                action = env.sparsity_to_action(plan[len(steps)]) if plan is not None else self.act(obs)
                next_obs, reward, done, _, info = env.step(action)
                steps.append((obs, action, next_obs, done))
                requested.append(info["requested"])
                obs = next_obs
        buffer = self.model.replay_buffer
        for o, a, o2, d in steps:  # AMC: the final reward for every step of the episode
            buffer.add(o[None], o2[None], a[None], np.array([reward]), np.array([d]), [{}])
        agent = None
        if self.episode_index >= self.warmup:  # batches are drawn with replacement
            self.model.train(gradient_steps=len(steps), batch_size=self.batch_size)
            agent = self._diagnostics()
        episode = Episode(np.asarray(requested), info["outcome"], rule=rule, agent=agent)
        if trial is not None:
            from autoprune.agents.baselines import best_own_replay, best_rule_replays

            room = self.episodes - len(trial.study.trials)
            if self.episode_index == len(self.portfolio) - 1:  # the last rule
                self.replays = best_rule_replays(env, trial.study, rule, episode, room=room)
            elif plan is None:  # the agent's own
                own = best_own_replay(env, trial.study, episode, room)
                if own is not None:
                    self.refill = (episode.requested, own, trial.number)
        self.episode_index += 1
        return episode

    def _plan(self, trial: optuna.Trial | None) -> tuple[str | None, np.ndarray | None, float | None]:
        """The rule this episode plays, its requested sparsities and the scale the wall aims by
        for it, or ``(None, None, None)`` for the agent's own: the portfolio's rules first, then
        the rules played again (:func:`~autoprune.agents.baselines.best_rule_replays`), and after
        an own episode that is the agent's best so far, that episode played again at its own ratio
        (:func:`~autoprune.agents.baselines.best_own_replay`), marked in ``trial`` as the samplers
        mark theirs."""
        i = self.episode_index - len(self.portfolio)
        if i < 0:
            return *self.portfolio[self.episode_index], None
        if self.refill is not None:
            plan, scale, of = self.refill
            self.refill = None
            if trial is not None:
                trial.set_user_attr("replay_of", of)
                trial.set_user_attr("scale", scale)
            return None, plan, scale
        if i < len(self.replays):
            rule, fraction, plan, scale = self.replays[i]
            if trial is not None:
                trial.set_user_attr("replay", True)
                trial.set_user_attr("aim", fraction)
                if scale is not None:
                    trial.set_user_attr("scale", scale)
            return rule, plan, scale
        return None, None, None

    def _diagnostics(self) -> dict:
        """What the agent learned from this episode, recorded in its trial (``agent``) so a learning
        curve can be read from the study: the mean critic and actor losses of its gradient steps,
        the exploration sigma it acted with, and the replay buffer's reward baseline."""
        logged = self.model.logger.name_to_value  # what train() recorded; never dumped here
        out = {key: round(float(logged[f"train/{key}"]), 6) for key in ("critic_loss", "actor_loss")
               if f"train/{key}" in logged}
        if self.explore_with_noise:
            out["sigma"] = round(self.sigma, 6)
        if self.model.replay_buffer.baseline is not None:
            out["baseline"] = round(float(self.model.replay_buffer.baseline), 6)
        return out

    # -- persistence --------------------------------------------------------------------------------
    def _torch_state(self) -> dict:
        """Networks and optimisers (``get_parameters``: name -> state_dict), and :attr:`tensors`
        as ``var:<name>``."""
        out = dict(self.model.get_parameters())
        out.update({f"var:{name}": getattr(self.model, name).detach().clone() for name in self.tensors})
        return out

    def save(self, directory: Path, pending: dict | None = None) -> None:
        # The replay buffer goes into the same payload as its public arrays rather than through
        # save_replay_buffer(), which pickles it to a file of its own: that file could not be read
        # with weights_only=True, nor written in one atomic step with the pending episode.
        buf = self.model.replay_buffer
        payload = {
            "torch": self._torch_state(),
            "buffer": {k: torch.from_numpy(getattr(buf, k).copy()) for k in
                       ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")},
            "buffer_pos": int(buf.pos),
            "buffer_full": bool(buf.full),
            "baseline": buf.baseline,
            "episode_index": self.episode_index,
            "replays": json.dumps([(r, f, [float(x) for x in p], c) for r, f, p, c in self.replays]),
            "refill": json.dumps(None if self.refill is None else
                                 ([float(x) for x in self.refill[0]], self.refill[1], self.refill[2])),
            "warmup": self.warmup,
            "study_uid": self.study_uid,
            "n_updates": int(self.model._n_updates),  # no public accessor (see module docstring)
            "rng": json.dumps(self.rng.bit_generator.state),
            "np_global": _np_state(),
            "torch_rng": torch.get_rng_state(),
            "pending": json.dumps(pending) if pending is not None else None,
        }
        directory.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(payload, directory / STATE_FILE)  # a kill leaves the previous episode's state

    def load(self, directory: Path) -> dict | None:
        path = directory / STATE_FILE
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign file
            raise AutopruneError(f"cannot read the agent checkpoint {path} ({type(err).__name__}); "
                                 "move it aside to restart the agent from scratch") from None
        if payload.get("study_uid") != self.study_uid:
            raise AutopruneError(f"the agent checkpoint in {directory} belongs to another study; "
                                 "pass a different --state-dir or move it aside")
        buf = self.model.replay_buffer
        if payload["buffer"]["observations"].shape != buf.observations.shape:
            raise AutopruneError(f"the agent checkpoint in {directory} was made for another model "
                                 "(replay buffer shape differs); move it aside")
        state = payload["torch"]
        self.model.set_parameters({k: v for k, v in state.items() if not k.startswith("var:")},
                                  exact_match=True)
        for name in self.tensors:
            getattr(self.model, name).data.copy_(state[f"var:{name}"])
        for k, v in payload["buffer"].items():
            getattr(buf, k)[...] = v.numpy()
        buf.pos, buf.full, buf.baseline = payload["buffer_pos"], payload["buffer_full"], payload["baseline"]
        self.episode_index = payload["episode_index"]
        replays = json.loads(payload.get("replays", "[]"))  # saved before they had a scale: three fields
        self.replays = [(r[0], r[1], np.asarray(r[2]), r[3] if len(r) > 3 else None) for r in replays]
        refill = json.loads(payload.get("refill", "null"))  # saved before own episodes were played again: none
        self.refill = None if refill is None else (np.asarray(refill[0]), refill[1], refill[2])
        self.warmup = payload["warmup"]
        self.model._n_updates = payload["n_updates"]  # no public setter (see module docstring)
        self.rng.bit_generator.state = json.loads(payload["rng"])
        _set_np_state(payload["np_global"])
        torch.set_rng_state(payload["torch_rng"])
        return json.loads(payload["pending"]) if payload["pending"] else None


def _np_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_np_state(s: dict) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached"]))


@SEARCHERS.register("ddpg", help="AMC's DDPG agent (stable-baselines3), layer by layer")
class DDPGSearcher(RLSearcher):
    name = "ddpg"
    algo = AMCDDPG


@SEARCHERS.register("td3", help="TD3 in AMC's episode scheme (twin critics, delayed updates)")
class TD3Searcher(RLSearcher):
    name = "td3"
    algo = AMCTD3


@SEARCHERS.register("sac", help="SAC in AMC's episode scheme (entropy-driven exploration)")
class SACSearcher(RLSearcher):
    name = "sac"
    algo = AMCSAC
    explore_with_noise = False
    tensors = ("log_ent_coef",)  # the learned entropy coefficient (ent_coef="auto")
