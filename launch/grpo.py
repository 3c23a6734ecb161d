"""GRPO from an SFT model: sampled groups per prompt, rule-based or user rewards, clipped objective + KL.

    deepspeed launch/grpo.py --init SFT_RUN --data PROMPTS.jsonl --out RUN_DIR [--reward answer --reward format]
"""

from minimind_fast.training.engine import train
from minimind_fast.training.grpo import GRPOStage

if __name__ == "__main__":
    train(GRPOStage)
