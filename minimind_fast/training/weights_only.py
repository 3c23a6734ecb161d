"""DeepSpeed's checkpoint files, unpickled weights-only.

DeepSpeed 0.19's `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`, so a crafted file in
a run directory would run its code on --resume. Every file DeepSpeed reads on a resume (the model's, the
optimizer's, each ZeRO partition's) goes through its engine's `checkpoint_engine.load`; `use_weights_only`
puts ours there, whose load admits only tensors, plain values and the DeepSpeed classes in `allowed_globals`.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from minimind_fast.checkpoint import load_failure, load_failure_reason

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def allowed_globals() -> list[type]:
    """The classes DeepSpeed's own checkpoint files hold beyond what weights_only admits by default.

    Found by saving a checkpoint under each layout this project trains (ZeRO 0-3; fp32, bf16; AdamW, Muon;
    LoRA) and listing what `torch.serialization.get_unsafe_globals_in_checkpoint` names: the ZeRO 1-3 optimizer
    files hold the stage as an enum, the loss scaler as an object, and (ZeRO 1/2 and bf16's optimizer) each
    parameter's place in the flat buffers as `fragment_address`. fp16 (CUDA only) keeps its dynamic scaler
    there in place of the static one. Each is plain data: rebuilding one runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's own engine, its saves unchanged, with a weights-only load."""

    def __init__(self, replaced: TorchCheckpointEngine):
        vars(self).update(vars(replaced))  # its settings (zip serialization) as DeepSpeed built them

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(allowed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: refused: a weights-only load does not unpickle it "
                             f"({load_failure_reason(e)}); DeepSpeed's checkpoints hold "
                             "only tensors, plain values and a few of its classes, so this file was not written "
                             "by minimind_fast's DeepSpeed, or was altered since") from None
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise ValueError(f"{path}: not a readable DeepSpeed checkpoint file ({load_failure(e)})") from e


def use_weights_only(engine: DeepSpeedEngine) -> None:
    """Make every checkpoint file `engine.load_checkpoint` reads load weights-only (idempotent).

    Refuses, rather than resume unguarded, what this cannot cover: another checkpoint engine (a DeepSpeed
    config's `checkpoint.writer` or `datastates` section, or a DeepSpeed release that renamed the attribute)
    and universal checkpoints (`checkpoint.load_universal`), which DeepSpeed reads with torch.load directly."""
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, WeightsOnlyCheckpointEngine):
        return
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed's checkpoint engine is {type(current).__name__}, not the TorchCheckpointEngine "
                         "whose loads minimind_fast makes weights-only; leave out the DeepSpeed config's "
                         "checkpoint.writer and datastates sections")
    if engine.load_universal_checkpoint():
        raise ValueError("the DeepSpeed config's checkpoint.load_universal: DeepSpeed reads universal checkpoints "
                         "with pickle's full load (which can run code), so minimind_fast does not; leave it out")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(current)
