"""PPO from an SFT model: one sampled completion per prompt, rule-based or user rewards, a value head (GAE).

    deepspeed launch/ppo.py --init SFT_RUN --data PROMPTS.jsonl --out RUN_DIR [--reward answer --reward format]
"""

from minimind_fast.training.engine import train
from minimind_fast.training.ppo import PPOStage

if __name__ == "__main__":
    train(PPOStage)
