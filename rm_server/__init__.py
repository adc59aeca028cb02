"""The reward-model service: load, score, batch, serve, train (Bradley-Terry), and its client."""

__version__ = "0.1.0"
