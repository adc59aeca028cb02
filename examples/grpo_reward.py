"""Use a served reward model as the reward function of TRL's GRPOTrainer (or any Python code).

    rm-server serve --model ./my-rm --port 50051 &
    python examples/grpo_reward.py --rm localhost:50051

TRL is not a dependency of this project; install it yourself (`pip install trl`) to run the
GRPO part. The plain-Python part runs with this project alone.
"""

import argparse

from rm_client import RemoteRewardFunction


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rm", default="localhost:50051", help="host:port[,host:port...]")
    ap.add_argument("--token", default=None)
    args = ap.parse_args()
    reward = RemoteRewardFunction(args.rm, token=args.token, client_id="grpo-example")

    # Plain Python: a batch of prompts and completions in, one float per completion out.
    print(reward(prompts=["The movie was"] * 2, completions=[" wonderful.", " a mess."]))

    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        print("trl/datasets not installed: skipping the GRPOTrainer part")
        return
    data = Dataset.from_dict({"prompt": ["The movie was", "I watched this film and"] * 8})
    trainer = GRPOTrainer(model="./my-policy", reward_funcs=[reward], train_dataset=data,
                          args=GRPOConfig(output_dir="grpo-out", max_steps=2, num_generations=4))
    trainer.train()


if __name__ == "__main__":
    main()
