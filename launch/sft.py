"""Full supervised fine-tuning (loss on assistant tokens only) from a pretrained run or checkpoint.

    deepspeed launch/sft.py --init RUN_DIR_OR_CHECKPOINT --data SFT_SHARDS --out RUN_DIR
"""

from minimind_fast.training.engine import train
from minimind_fast.training.stages import SFTStage

if __name__ == "__main__":
    train(SFTStage)
