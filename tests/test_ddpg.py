"""The DDPG agent shared by HAQ and AMC: deterministic updates, exploration, reward credit, and that it learns."""

import math

import pytest
import torch

from squeeze.agents import DDPG, DDPGConfig, run_episodes
from squeeze.agents.ddpg import truncated_normal

SMALL = DDPGConfig(hidden=(32, 32), batch_size=8, replay_per_step=16, warmup_episodes=2, seed=3)


def _filled(config: DDPGConfig = SMALL) -> DDPG:
    agent = DDPG(state_dim=4, action_dim=1, steps_per_episode=3, config=config)
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        s, s2 = torch.rand(4, generator=g), torch.rand(4, generator=g)
        agent.memory.add(s, torch.rand(1, generator=g), float(i % 3) * 0.1, s2, i % 3 == 2)
    return agent


def _params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_update_same_seed_same_numbers_and_parameters_move():
    a, b = _filled(), _filled()
    actor0, critic0, target0 = _params(a.actor), _params(a.critic), _params(a.critic_target)
    losses_a = [a.update() for _ in range(3)]
    losses_b = [b.update() for _ in range(3)]
    assert losses_a == losses_b
    assert torch.equal(_params(a.actor), _params(b.actor))
    assert torch.equal(_params(a.critic_target), _params(b.critic_target))
    assert not torch.equal(_params(a.actor), actor0)
    assert not torch.equal(_params(a.critic), critic0)
    # Soft update: the target moved, but only a tau-sized step towards the online critic.
    moved = (_params(a.critic_target) - target0).abs().max()
    assert 0 < moved < (_params(a.critic) - target0).abs().max()
    other = _filled(DDPGConfig(**{**SMALL.__dict__, "seed": 4}))
    assert other.update() != losses_a[0]


def test_caller_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    agent = _filled()
    agent.update()
    agent.act(torch.zeros(4), episode=0)
    assert torch.equal(torch.rand(3), expected)


def test_critic_loss_decreases_on_a_fixed_batch():
    agent = _filled(DDPGConfig(**{**SMALL.__dict__, "batch_size": 24, "tau": 0.0, "discount": 0.0}))
    first = agent.update()[0]
    for _ in range(60):
        last = agent.update()[0]
    assert last < 0.2 * first


def test_reward_baseline_is_a_moving_average_of_batch_means():
    agent = _filled()
    agent.update()
    b1 = agent.baseline
    assert 0.0 <= b1 <= 0.2  # rewards are 0, 0.1, 0.2
    agent.memory.rewards.fill_(1.0)
    agent.update()
    assert agent.baseline == pytest.approx(b1 + 0.5 * (1.0 - b1))


def test_truncated_normal_stays_in_range_and_centres_on_mu():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.0, 0.3, 1.0] * 2000)
    x = truncated_normal(mu, 0.5, 0.0, 1.0, g)
    assert x.min() >= 0 and x.max() <= 1
    x = truncated_normal(torch.full((4000,), 0.3), 0.01, 0.0, 1.0, g)
    assert abs(float(x.mean()) - 0.3) < 1e-3 and float(x.std()) == pytest.approx(0.01, rel=0.1)
    # Far in a tail (mu outside the interval, tiny sigma) it still returns values in range.
    x = truncated_normal(torch.tensor([5.0, -5.0]), 1e-3, 0.0, 1.0, g)
    assert x.tolist() == [1.0, 0.0]


def test_warmup_then_decaying_noise():
    agent = DDPG(4, 1, 3, DDPGConfig(warmup_episodes=20, init_noise=0.5, noise_decay=0.99))
    assert agent.exploring_randomly(19) and not agent.exploring_randomly(20)
    assert agent.noise_sigma(20) == 0.5
    assert agent.noise_sigma(120) == pytest.approx(0.5 * 0.99 ** 100)


class _Bandit:
    """Three steps per episode; the reward at the end is best when every action is 0.8."""

    def __init__(self):
        self.t, self.actions = 0, []

    def reset(self):
        self.t, self.actions = 0, []
        return torch.tensor([0.0, 0.0])

    def step(self, action):
        self.actions.append(float(action[0]))
        self.t += 1
        done = self.t == 3
        reward = -sum((a - 0.8) ** 2 for a in self.actions) / 3 if done else 0.0
        return torch.tensor([self.t / 3, 1.0]), reward, done, {"t": self.t}


def test_final_reward_credited_to_every_step():
    agent = DDPG(2, 1, 3, SMALL)
    records = run_episodes(_Bandit(), agent, episodes=2)
    assert len(agent.memory) == 6
    for i, rec in enumerate(records):
        assert agent.memory.rewards[3 * i: 3 * i + 3].flatten().tolist() == [pytest.approx(rec.reward)] * 3
        assert agent.memory.dones[3 * i: 3 * i + 3].flatten().tolist() == [0.0, 0.0, 1.0]
        assert rec.noise_sigma is None and rec.critic_loss is None  # warm-up: no updates


def test_agent_learns_a_bandit():
    agent = DDPG(2, 1, 3, DDPGConfig(hidden=(64, 64), lr_actor=1e-3, warmup_episodes=10, noise_decay=0.95, seed=0))
    before = float(agent.greedy(torch.tensor([0.0, 0.0]))[0])
    records = run_episodes(_Bandit(), agent, episodes=300)
    after = [float(agent.greedy(torch.tensor([t / 3, float(t > 0)]))[0]) for t in range(3)]
    assert abs(before - 0.8) > 0.2
    assert all(abs(a - 0.8) < 0.1 for a in after), after
    assert math.isfinite(records[-1].critic_loss)
