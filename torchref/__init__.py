"""torchref: the original nanoGPT-style PyTorch reward model, with only the fixes it needs to run."""
from torchref.model import MHA, Block, FeedForward, RewardModel, per_token_rewards

__all__ = ["MHA", "FeedForward", "Block", "RewardModel", "per_token_rewards"]
