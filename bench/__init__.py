"""Benchmarks that print ratios measured side by side; run from the repository root as modules.

    python -m bench.serve --quick          # the serving benchmark (ours, the limit, a naive server)
    python -m bench.kernel_timings         # kernels/ against the math they replace
    python -m bench.prefix                 # prefix-shared scoring against the unshared path
    python -m bench.ppo --quick            # the PPO pipeline, RM overlapped against sequential
    python -m bench.naive_server ...       # the naive baseline server (bench.serve starts it)
    python -m bench.trl_ppo                # the PPO step against TRL 1.12's PPOTrainer (its venv)
    python -m bench.rm_train               # RM training against TRL's RewardTrainer (its venv)

Results, with the commands that produced them: bench/RESULTS.md. Not part of the installed
distribution: the modules import the product packages from the checkout they run in.
"""
