"""LoRA fine-tuning on SFT shards: adapters on a frozen base model, saved apart in a small file.

    deepspeed launch/lora.py --init RUN_DIR_OR_CHECKPOINT --data SFT_SHARDS --out RUN_DIR \
        [--lora-rank 8 --lora-alpha 16 --lora-dropout 0 --lora-targets q_proj k_proj v_proj o_proj ...]

The run ends with RUN_DIR/final/ (the base weights, unchanged) and RUN_DIR/final/adapter/; chat with
`launch/chat.py --model RUN_DIR --lora RUN_DIR`, merge with `launch/convert.py merge-lora`.
"""

from minimind_fast.training.engine import train
from minimind_fast.training.lora_stage import LoraStage

if __name__ == "__main__":
    train(LoraStage)
