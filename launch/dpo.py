"""DPO on preference pairs (DPO shards) against a frozen reference model (default: the --init model).

    deepspeed launch/dpo.py --init SFT_RUN_DIR --data DPO_SHARDS --out RUN_DIR \
        [--beta 0.1] [--reference MODEL] [--precompute-reference] [--label-smoothing 0.0]

Logs dpo_loss, reward_chosen, reward_rejected, reward_margin and reward_accuracy every --log-every
steps; val_loss is the DPO loss of the val split's pairs.
"""

from minimind_fast.training.dpo import DPOStage
from minimind_fast.training.engine import train

if __name__ == "__main__":
    train(DPOStage)
