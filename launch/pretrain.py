"""Pretrain a MiniMind model from scratch on `.bin` shards.

    deepspeed [--num_gpus N] launch/pretrain.py --preset small-26m --data SHARDS --out RUN_DIR
    python launch/pretrain.py ...        (one process; also works under torchrun)
"""

from minimind_fast.training.engine import train
from minimind_fast.training.stages import PretrainStage

if __name__ == "__main__":
    train(PretrainStage)
