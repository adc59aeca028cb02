"""The demo's small synthetic world: a movie-review grammar, a hidden gold reward, a tiny base LM.

``python -m demo.build --out DIR`` builds the artifacts every RLHF stage starts from (see
DESIGN.md §7): `demo.world` is the world itself (pure Python), `demo.build` trains the tokenizer
and the base LM and writes the JSONL data, `demo.evaluate` samples a policy and scores it with
the gold reward.
"""
