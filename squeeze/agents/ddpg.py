"""DDPG as in the AMC and HAQ reference code (mit-han-lab/amc, mit-han-lab/haq: lib/rl/ddpg.py).

One layer is one step: the state describes the layer, the action is one number in [0, 1] (a preserve
ratio for AMC, a bit width for HAQ). The reward comes only at the end of the episode and is credited to
every step of it; a moving average of the batch rewards is subtracted as a baseline. The first
`warmup_episodes` take uniform random actions and only fill the replay buffer; after that, actions are
the actor's output plus truncated-normal noise on [0, 1] whose sigma decays every episode.

Everything random (network init, noise, replay sampling) comes from the config's seed, and the caller's
RNG state is left untouched: the same seed gives the same numbers on the same machine.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

__all__ = ["DDPGConfig", "Actor", "Critic", "ReplayBuffer", "DDPG", "Environment", "EpisodeRecord", "run_episodes",
           "truncated_normal"]


@dataclass(frozen=True)
class DDPGConfig:
    """Defaults are HAQ's (AMC differs in warm-up 100 and noise decay 0.95)."""

    hidden: tuple[int, int] = (300, 300)
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    tau: float = 0.01  # soft update: target <- (1 - tau) target + tau online
    discount: float = 1.0
    batch_size: int = 64
    replay_per_step: int = 128  # replay capacity = this x steps per episode
    warmup_episodes: int = 20
    init_noise: float = 0.5  # sigma of the exploration noise in the first episode after warm-up
    noise_decay: float = 0.99  # per episode
    baseline_alpha: float = 0.5  # moving average of batch rewards: b += alpha (mean - b)
    seed: int = 0


class Actor(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: tuple[int, int]) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
                                 nn.Linear(hidden[1], action_dim), nn.Sigmoid())

    def forward(self, state: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, A) in [0, 1]
        return self.net(state)


class Critic(nn.Module):
    """Q(s, a): state and action enter through separate first layers that are summed (as the reference)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: tuple[int, int]) -> None:
        super().__init__()
        self.state_in = nn.Linear(state_dim, hidden[0])
        self.action_in = nn.Linear(action_dim, hidden[0])
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Linear(hidden[1], 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:  # -> (B, 1)
        return self.head(self.state_in(state) + self.action_in(action))


class ReplayBuffer:
    """A ring buffer of transitions (s, a, r, s', done), sampled uniformly with the agent's generator."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int) -> None:
        self.capacity = capacity
        self.states = torch.zeros(capacity, state_dim)
        self.actions = torch.zeros(capacity, action_dim)
        self.rewards = torch.zeros(capacity, 1)
        self.next_states = torch.zeros(capacity, state_dim)
        self.dones = torch.zeros(capacity, 1)
        self.size = 0
        self._next = 0

    def __len__(self) -> int:
        return self.size

    def add(self, state, action, reward: float, next_state, done: bool) -> None:
        i = self._next
        self.states[i] = torch.as_tensor(state, dtype=torch.float32)
        self.actions[i] = torch.as_tensor(action, dtype=torch.float32)
        self.rewards[i] = reward
        self.next_states[i] = torch.as_tensor(next_state, dtype=torch.float32)
        self.dones[i] = float(done)
        self._next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(0, self.size, (batch_size,), generator=generator)
        return self.states[idx], self.actions[idx], self.rewards[idx].clone(), self.next_states[idx], self.dones[idx]


def truncated_normal(mu: torch.Tensor, sigma: float, low: float, high: float,
                     generator: torch.Generator) -> torch.Tensor:
    """One sample per element of N(mu, sigma) restricted to [low, high], by inverting the normal CDF."""
    mu = mu.double()
    cdf_low = torch.special.ndtr((low - mu) / sigma)
    cdf_high = torch.special.ndtr((high - mu) / sigma)
    u = cdf_low + (cdf_high - cdf_low) * torch.rand(mu.shape, generator=generator, dtype=torch.float64)
    # Far in a tail both CDFs round to the same value; the clamp keeps ndtri finite there.
    x = mu + sigma * torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12))
    return x.clamp(low, high).float()


class DDPG:
    def __init__(self, state_dim: int, action_dim: int, steps_per_episode: int,
                 config: DDPGConfig = DDPGConfig()) -> None:
        self.config = config
        self.action_dim = action_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.actor = Actor(state_dim, action_dim, config.hidden)
            self.critic = Critic(state_dim, action_dim, config.hidden)
            self.actor_target = Actor(state_dim, action_dim, config.hidden)
            self.critic_target = Critic(state_dim, action_dim, config.hidden)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=config.lr_actor)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=config.lr_critic)
        self.memory = ReplayBuffer(config.replay_per_step * steps_per_episode, state_dim, action_dim)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.baseline: float | None = None

    def noise_sigma(self, episode: int) -> float:
        return self.config.init_noise * self.config.noise_decay ** max(0, episode - self.config.warmup_episodes)

    def exploring_randomly(self, episode: int) -> bool:
        return episode < self.config.warmup_episodes

    @torch.no_grad()
    def act(self, state, episode: int) -> torch.Tensor:
        """The action for `state` in `episode` (0-based): uniform random during warm-up, else actor + noise."""
        if self.exploring_randomly(episode):
            return torch.rand(self.action_dim, generator=self.generator)
        mu = self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0]
        return truncated_normal(mu, self.noise_sigma(episode), 0.0, 1.0, self.generator)

    @torch.no_grad()
    def greedy(self, state) -> torch.Tensor:
        return self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0]

    def update(self) -> tuple[float, float]:
        """One DDPG step on a replay batch: critic (MSE to the target Q), actor (-Q), soft target update.

        Returns (critic loss, actor loss) before the step.
        """
        c = self.config
        states, actions, rewards, next_states, dones = self.memory.sample(c.batch_size, self.generator)
        batch_mean = float(rewards.mean())
        if self.baseline is None:
            self.baseline = batch_mean
        else:
            self.baseline += c.baseline_alpha * (batch_mean - self.baseline)
        rewards -= self.baseline
        with torch.no_grad():
            next_q = self.critic_target(next_states, self.actor_target(next_states))
            target_q = rewards + c.discount * (1.0 - dones) * next_q
        critic_loss = nn.functional.mse_loss(self.critic(states, actions), target_q)
        self.critic_optim.zero_grad()
        critic_loss.backward()
        self.critic_optim.step()
        actor_loss = -self.critic(states, self.actor(states)).mean()
        self.actor_optim.zero_grad()
        actor_loss.backward()
        self.actor_optim.step()
        _soft_update(self.actor_target, self.actor, c.tau)
        _soft_update(self.critic_target, self.critic, c.tau)
        return float(critic_loss.detach()), float(actor_loss.detach())

    def observe_episode(self, transitions: list[tuple[Any, Any, Any, bool]], final_reward: float,
                        episode: int) -> list[tuple[float, float]]:
        """Store the episode's (s, a, s', done) steps, each with the final reward; after warm-up, one update
        per step (as the reference). Returns the losses of those updates."""
        losses = []
        with _one_thread():
            for state, action, next_state, done in transitions:
                self.memory.add(state, action, final_reward, next_state, done)
                if not self.exploring_randomly(episode):
                    losses.append(self.update())
        return losses


@contextlib.contextmanager
def _one_thread():
    """The actor and critic are small MLPs: more intra-op threads only add synchronization, and on a busy
    machine their spinning made an update 10-40x slower (measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.mul_(1.0 - tau).add_(s, alpha=tau)


class Environment(Protocol):
    """One episode walks the layers: `reset()` gives the first state, `step(action)` the next state, the
    reward (only the last step's counts), whether the episode is done, and an info dict."""

    def reset(self): ...

    def step(self, action: torch.Tensor) -> tuple[Any, float, bool, dict[str, Any]]: ...


@dataclass
class EpisodeRecord:
    episode: int
    reward: float
    actions: list[float]
    info: dict[str, Any]
    noise_sigma: float | None  # None: random warm-up episode
    critic_loss: float | None  # mean over the episode's updates
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_episodes(env: Environment, agent: DDPG, episodes: int,
                 on_episode: Callable[[EpisodeRecord], None] | None = None) -> list[EpisodeRecord]:
    """The search loop of the reference: act, step to the end, credit the final reward to every step."""
    records = []
    for episode in range(episodes):
        started = time.perf_counter()
        state, done, steps = env.reset(), False, []
        while not done:
            action = agent.act(state, episode)
            next_state, reward, done, info = env.step(action)
            steps.append((state, action, next_state, done))
            state = next_state
        losses = agent.observe_episode(steps, reward, episode)
        record = EpisodeRecord(
            episode, reward, [float(a[0]) for _, a, _, _ in steps], info,
            None if agent.exploring_randomly(episode) else agent.noise_sigma(episode),
            sum(c for c, _ in losses) / len(losses) if losses else None, time.perf_counter() - started)
        records.append(record)
        if on_episode:
            on_episode(record)
    return records
