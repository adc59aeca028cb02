"""The contract between the reward server and its clients, and nothing of either side.

- ``reward.proto``: the wire contract (service ``rlhf.reward.v1.RewardService``, a comment on
  every field); ``reward_pb2.py``, ``reward_pb2.pyi``, ``reward_pb2_grpc.py``: its generated
  stubs; ``generate.py``: the one command that makes them (``make protos``; a test checks that
  the committed stubs are fresh).
- ``service_name.py``: the service's full name, read from the compiled descriptor.
- ``encoding.py``: what both sides must agree on beyond the messages: the rule that turns text,
  conversations, full texts and token ids into the token ids a reward model scores, and the
  tokenizer fingerprint that tells a client its ids mean the same thing on the server.
- ``recipes.py``: the scoring recipes that rule follows, one per convention (this project's,
  TRL's, TRL GRPO's, OpenRLHF's, an encoder's pair encoding), and how one is chosen.

Imports nothing of this repository outside ``protos``, and nothing heavy (no torch, no
transformers), so the light client library can depend on it.
"""
