"""DeepSpeed's checkpoint files loaded weights-only (minimind_fast.training.weights_only): what DeepSpeed
writes loads as a full unpickle loads it, what would run code or is no checkpoint is refused naming the
file. Resume runs of every layout are in test_engine.py, test_optim.py and test_stage_lora.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from launch_helpers import ENV, ROOT

from minimind_fast.training.weights_only import WeightsOnlyCheckpointEngine, use_weights_only

# fp16 needs CUDA in minimind_fast, but DeepSpeed's ZeRO optimizer runs it on the CPU too: one step and a
# save, then every file loaded both ways. Its dynamic loss scaler is the one class no CPU run writes.
FP16_SAVE = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": int(sys.argv[2])},
          "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
engine.backward(engine(torch.randn(1, 8, dtype=torch.half)).float().sum())
engine.step()
engine.save_checkpoint(sys.argv[1], tag="state")
"""


def same(a, b) -> bool:
    """Equal as values: tensors bitwise (dtype included), objects by type and attributes."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and same(vars(a), vars(b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("stage", [1, 3])
def test_fp16_zero_checkpoints_load_as_a_full_unpickle_does(tmp_path, stage):
    subprocess.run([sys.executable, "-c", FP16_SAVE, str(tmp_path / "ckpt"), str(stage), str(29640 + stage)],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    files = sorted((tmp_path / "ckpt" / "state").glob("*.pt"))
    assert len(files) == 2, files  # the model's and the ZeRO partition's optimizer state
    loader = WeightsOnlyCheckpointEngine(TorchCheckpointEngine())
    for path in files:
        loaded = loader.load(str(path), map_location="cpu")
        assert same(loaded, torch.load(path, map_location="cpu", weights_only=False)), path  # this test's own file
        if "optim" in path.name:
            assert type(loaded["optimizer_state_dict"]["loss_scaler"]).__name__ == "DynamicLossScaler"


class _TouchOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_file_that_would_run_code_or_is_no_checkpoint_is_refused_naming_it(tmp_path):
    loader = WeightsOnlyCheckpointEngine(TorchCheckpointEngine())
    crafted, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "code_ran"
    torch.save({"module": {"w": torch.ones(2)}, "payload": _TouchOnLoad(marker)}, crafted)
    with pytest.raises(ValueError, match=f"{crafted}: refused: a weights-only load does not unpickle it "
                                         r"\(Unsupported global: GLOBAL getattr"):
        loader.load(str(crafted))
    assert not marker.exists()
    cut = tmp_path / "cut.pt"
    torch.save({"module": {"w": torch.ones(1000)}}, cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    with pytest.raises(ValueError, match=f"{cut}: not a readable DeepSpeed checkpoint file"):
        loader.load(str(cut))


def test_the_engine_is_replaced_once_and_what_it_cannot_guard_is_refused(tmp_path):
    deepspeed_own = TorchCheckpointEngine()
    deepspeed_own.zipfile_serialization = True
    engine = SimpleNamespace(checkpoint_engine=deepspeed_own, load_universal_checkpoint=lambda: False)
    use_weights_only(engine)
    replaced = engine.checkpoint_engine
    assert type(replaced) is WeightsOnlyCheckpointEngine and replaced.zipfile_serialization
    use_weights_only(engine)
    assert engine.checkpoint_engine is replaced
    # A DeepSpeed that renamed the attribute (or swapped the engine) fails loudly, not silently unguarded.
    with pytest.raises(ValueError, match="checkpoint engine is NoneType, not the TorchCheckpointEngine"):
        use_weights_only(SimpleNamespace(load_universal_checkpoint=lambda: False))
    with pytest.raises(ValueError, match="checkpoint.load_universal"):
        use_weights_only(SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(),
                                         load_universal_checkpoint=lambda: True))
