"""Reasoning distillation: SFT on <think>...</think><answer>...</answer> data with extra loss weight on
the tag tokens, plus, with --teacher, a KL term towards the teacher's logits at a temperature.

    deepspeed launch/distill.py --init RUN_DIR_OR_CHECKPOINT --data REASONING_SHARDS --out RUN_DIR \
        [--teacher TEACHER_RUN_DIR --kd-temperature 2 --kd-alpha 0.5] [--special-token-weight 10]
"""

from minimind_fast.training.engine import train
from minimind_fast.training.stages import ReasoningStage

if __name__ == "__main__":
    train(ReasoningStage)
