"""The client library of the reward service (imports only ``protos``; no torch).

    from rm_client import RewardClient, text_sample
    with RewardClient("127.0.0.1:50051") as rm:
        [result] = rm.score([text_sample("a", "Q: 2+2?", " 4")])

``RewardClient`` / ``AsyncRewardClient``: deadlines, retries with backoff, round-robin over
replicas, streams resumed with exactly the unanswered samples. ``RemoteRewardFunction``: the
adapter TRL's trainers call as a reward function.
"""

from rm_client.client import (AddressError, AsyncRewardClient, RewardClient, ScoreResult,
                              ScoringError, TLSConfig, chat_sample, parse_targets, text_sample,
                              token_sample)
from rm_client.reward_fn import AsyncRemoteRewardFunction, RemoteRewardFunction

__all__ = ["AddressError", "AsyncRemoteRewardFunction", "AsyncRewardClient", "RemoteRewardFunction",
           "RewardClient", "ScoreResult", "ScoringError", "TLSConfig", "chat_sample",
           "parse_targets", "text_sample", "token_sample"]
