"""A reward model on preference pairs (DPO shards): the --init model plus a scalar head, Bradley-Terry loss.

    deepspeed launch/reward_model.py --init SFT_RUN_OR_CHECKPOINT --data DPO_SHARDS --out RUN_DIR [--center-coef 0.01]

Logs bt_loss, accuracy, margin, reward_chosen and reward_rejected every --log-every steps; val_loss is the
Bradley-Terry loss of the val split's pairs. RUN_DIR/final/ is a plain model plus reward_head.safetensors:
give it to GRPO or PPO as --reward-model RUN_DIR[:WEIGHT].
"""

from minimind_fast.training.engine import train
from minimind_fast.training.reward_model import RewardModelStage

if __name__ == "__main__":
    train(RewardModelStage)
