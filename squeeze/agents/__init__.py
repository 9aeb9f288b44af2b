"""Reinforcement-learning agents shared by the searches (HAQ's bit widths, AMC's channel ratios)."""

from squeeze.agents.ddpg import DDPG, DDPGConfig, EpisodeRecord, Environment, ReplayBuffer, run_episodes

__all__ = ["DDPG", "DDPGConfig", "EpisodeRecord", "Environment", "ReplayBuffer", "run_episodes"]
