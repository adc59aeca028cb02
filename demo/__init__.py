"""The demo's small synthetic world: a movie-review grammar, a hidden gold reward, a tiny base LM.

No model hub is needed: a new user sees the whole system work on a CPU in minutes, and because
the gold reward is known, the demo can show that it rises (and, with β = 0, that the RM's score
keeps rising while the gold turns down: reward over-optimization, Gao et al. 2022).

``python -m demo.build --out DIR`` builds the artifacts every RLHF stage starts from:
`demo.world` is the world itself (pure Python), `demo.build` trains the tokenizer and the base
LM and writes the JSONL data, `demo.labeler` is the simulated human (Bradley-Terry noise around
the gold reward), `demo.evaluate` samples a policy and scores it with the gold reward,
`demo.run` runs the three stages for real and `demo.report` prints what they did.
"""
