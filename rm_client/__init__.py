"""The client library of the reward service (imports only ``protos``; no torch).

    from rm_client import RewardClient, text_sample
    with RewardClient("127.0.0.1:50051") as rm:
        [result] = rm.score([text_sample("a", "Q: 2+2?", " 4")])

One concept per module: ``client.py`` (``AsyncRewardClient``: deadlines, retries with backoff,
round-robin over replicas, streams resumed with exactly the unanswered samples), ``sync.py``
(``RewardClient``, the same without an event loop), ``targets.py`` (address checks),
``samples.py`` (sample builders, ``ScoreResult``), ``reward_fn.py`` (``RemoteRewardFunction``:
the adapter TRL's trainers call as a reward function).
"""

from rm_client.client import AsyncRewardClient, ScoringError, TLSConfig
from rm_client.reward_fn import AsyncRemoteRewardFunction, RemoteRewardFunction
from rm_client.samples import ScoreResult, chat_sample, text_sample, token_sample
from rm_client.sync import RewardClient
from rm_client.targets import AddressError, parse_targets

__all__ = ["AddressError", "AsyncRemoteRewardFunction", "AsyncRewardClient", "RemoteRewardFunction",
           "RewardClient", "ScoreResult", "ScoringError", "TLSConfig", "chat_sample",
           "parse_targets", "text_sample", "token_sample"]
