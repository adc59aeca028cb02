"""Use served reward models as the reward functions of TRL's GRPOTrainer (or any Python code).

    rm-server serve --model ./my-rm --port 50051 &
    python examples/grpo_reward.py --rm localhost:50051                       # plain Python only
    python examples/grpo_reward.py --rm localhost:50051 --policy ./my-policy  # + GRPO, 2 steps
    python examples/grpo_reward.py --rm helpful=rm-a:50051 --rm safe=rm-b:50051 --policy DIR

Each ``--rm [NAME=]HOST:PORT[,HOST:PORT...]`` is one reward model (several addresses: replicas
of it) and one reward function, logged by TRL under NAME (``rewards/NAME/mean``; default
``remote_rm``, then ``remote_rm_2``...). With ``--policy``, the policy's tokenizer goes to each
function, so the ids TRL generated are scored as they are when that RM's tokenizer and scoring
recipe match the policy's (fingerprints compared at the first call), and as text otherwise.

TRL is not a dependency of this project (``pip install trl``, or the project's ``dev`` extra);
the plain-Python part runs with the light client install alone (``pip install
rlhf-rm-service``). Runs on a CPU: bf16 only where CUDA supports it (TRL's default is bf16).
"""

import argparse
import json


def reward_functions(specs: list[str], token: str | None, tokenizer=None) -> list:
    from rm_client import RemoteRewardFunction

    funcs = []
    for i, spec in enumerate(specs):
        name, _, address = spec.rpartition("=")
        name = name or ("remote_rm" if i == 0 else f"remote_rm_{i + 1}")
        funcs.append(RemoteRewardFunction(address, name=name, token=token, tokenizer=tokenizer,
                                          client_id="grpo-example"))
    return funcs


def train_grpo(policy: str, funcs: list, out: str, steps: int) -> list[dict]:
    """``steps`` GRPO steps of ``policy`` against ``funcs``; TRL's log rows."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = ["The movie was", "I watched this film and", "The acting", "The ending"]
    args = GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=16, learning_rate=1e-5, logging_steps=1, save_strategy="no",
        report_to="none", seed=0,
        # TRL defaults to bf16, which a CPU cannot train in; use it where CUDA supports it
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    trainer = GRPOTrainer(model=policy, reward_funcs=funcs, args=args,
                          train_dataset=Dataset.from_dict({"prompt": prompts * 4}))
    trainer.train()
    return [row for row in trainer.state.log_history if any(k.startswith("rewards/") for k in row)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rm", action="append", default=None, metavar="[NAME=]HOST:PORT",
                    help="a reward model (repeat for several); default localhost:50051")
    ap.add_argument("--token", default=None, help="bearer token, when the server has auth on")
    ap.add_argument("--policy", default=None,
                    help="policy checkpoint directory (or hub id) to train with GRPO")
    ap.add_argument("--steps", type=int, default=2, help="GRPO steps")
    ap.add_argument("--out", default="grpo-out", help="TRL's output directory")
    args = ap.parse_args(argv)
    specs = args.rm or ["localhost:50051"]

    # Plain Python: a batch of prompts and completions in, one float per completion out.
    for f in reward_functions(specs, args.token):
        print(f"{f.__name__}:", f(prompts=["The movie was"] * 2,
                                  completions=[" wonderful.", " a mess."]))
        f.close()
    if args.policy is None:
        print("pass --policy DIR to train a policy with TRL's GRPOTrainer against these RMs")
        return 0

    try:
        import trl  # noqa: F401  (brings transformers and datasets)
        from transformers import AutoTokenizer
    except ImportError:
        print("GRPO needs TRL: pip install trl")
        return 1
    funcs = reward_functions(specs, args.token, AutoTokenizer.from_pretrained(args.policy))
    try:
        rows = train_grpo(args.policy, funcs, args.out, args.steps)
    finally:
        for f in funcs:
            f.close()
    for f in funcs:
        print(f"{f.__name__}: {'token ids' if f.sends_token_ids else 'text'} sent")
    for row in rows:
        rewards = {k: v for k, v in row.items() if k.startswith("rewards/")}
        print(f"grpo step {row['step']}: {json.dumps(rewards)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
