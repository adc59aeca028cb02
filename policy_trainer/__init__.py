"""The policy side of RLHF: SFT (``sft``), PPO math (``ppo``), data readers (``data``).

Modules are imported on demand (``policy_trainer.cli`` loads only the command being run), so
importing this package stays cheap.
"""
