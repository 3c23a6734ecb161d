"""The DeepSpeed config built from flags: defaults, what a user's file keeps, and what the default bf16
path costs the host per optimizer step."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from launch_helpers import ENV, ROOT

from minimind_fast.training.ds_config import build_ds_config, precision


def build(**kw):
    args = {"micro_batch_size": 4, "grad_accum": 1, "grad_clip": 1.0, "zero_stage": None, "dtype": "bf16"}
    return build_ds_config(**{**args, **kw})


def test_bf16_defaults_to_zero1_with_fp32_gradient_accumulation():
    cfg = build()
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert precision(cfg) == "bf16"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_other_precisions_default_to_zero0(dtype):
    cfg = build(dtype=dtype)
    assert cfg["zero_optimization"]["stage"] == 0 and "data_types" not in cfg and precision(cfg) == dtype


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_an_explicit_stage_wins_and_keeps_deepspeeds_gradient_dtype(stage):
    cfg = build(zero_stage=stage)
    assert cfg["zero_optimization"]["stage"] == stage and "data_types" not in cfg


def test_the_users_file_wins(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                                "data_types": {"grad_accum_dtype": "bf16"}}))
    cfg = build(dtype="fp32", zero_stage=3, user_file=str(path))
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["data_types"] == {"grad_accum_dtype": "bf16"}
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    cfg = build(dtype="fp32", user_file=str(path))  # bf16 from the file: the bf16 defaults follow it
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["data_types"] == {"grad_accum_dtype": "fp32"}


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "a DeepSpeed config is a JSON object, got list"),
    (b'{"zero_optimization": null}', "'zero_optimization' must be a JSON object, got None"),
    (b'{"bf16": true}', "'bf16' must be a JSON object, got True"),
    (b'{"train_micro_batch_size_per_gpu": "auto"}', "'train_micro_batch_size_per_gpu' must be a positive integer"),
    (b'{"gradient_accumulation_steps": 0}', "'gradient_accumulation_steps' must be a positive integer, got 0"),
    (b'{"zero_optimization": {"stage": 5}}', "zero_optimization.stage must be 0, 1, 2 or 3, got 5"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"gradient_clipping": "1.0"}', "'gradient_clipping' must be a number >= 0 (0: no clipping), got '1.0'"),
    (b'{"gradient_clipping": -1}', "'gradient_clipping' must be a number >= 0 (0: no clipping), got -1"),
    (b'{"checkpoint": []}', "'checkpoint' must be a JSON object, got []"),
    # Checkpoints a resume could not load weights-only (another checkpoint engine, or a full unpickle).
    (b'{"checkpoint": {"writer": {"type": "python"}}}', "'checkpoint.writer' is not supported: minimind_fast "
     "resumes through DeepSpeed's default checkpoint engine, whose loads it makes weights-only"),
    (b'{"checkpoint": {"load_universal": true}}', "'checkpoint.load_universal' is not supported"),
    (b'{"datastates_ckpt": {}}', "'datastates_ckpt' is not supported"),
    # Refused by DeepSpeed's own parsing: an assertion, and pydantic's report naming neither file nor section.
    (b'{"bf16": {"enabled": true}, "fp16": {"enabled": true}}', "bfloat16 and fp16 modes cannot be"),
    (b'{"zero_optimization": {"stage": 2, "overlap_com": true}}',
     "zero_optimization.overlap_com: Extra inputs are not permitted (got True)"),
    (b'{"zero_optimization": {"stage": 3, "offload_param": {"device": "disk"}}}',
     "zero_optimization.offload_param.device: Input should be"),
])
def test_a_malformed_file_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        build(user_file=str(path))


def test_checkpoint_settings_that_keep_the_default_engine_are_accepted(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"checkpoint": {"tag_validation": "Fail", "load_universal": False},
                                "datastates_ckpt": False}))
    assert build(user_file=str(path))["checkpoint"] == {"tag_validation": "Fail", "load_universal": False}


def test_settings_the_engine_would_ignore_are_refused(tmp_path):
    """The file's settings win, so none may be dropped in silence: DeepSpeed takes the engine's own
    optimizer and schedule over the file's, and derives the global batch itself."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}))
    with pytest.raises(ValueError, match="'optimizer' would not be used"):
        build(user_file=str(path))
    path.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ValueError, match=r"train_batch_size 64 is not .* x 2 rank\(s\) = 16"):
        build(user_file=str(path), world_size=2)
    cfg = build(user_file=str(path), world_size=8)  # consistent: kept out for DeepSpeed to derive
    assert "train_batch_size" not in cfg and cfg["train_micro_batch_size_per_gpu"] == 8


# One process, the CPU: count the aten ops and host reads (`_local_scalar_dense`, what .item() and
# float() dispatch to) inside DeepSpeed's engine.step() for the small-26m model (74 parameters).
COUNT_STEP_OPS = r"""
import collections, json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import deepspeed, torch
from torch.utils._python_dispatch import TorchDispatchMode
from minimind_fast.config import get_preset
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.ds_config import build_ds_config

class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

deepspeed.init_distributed(dist_backend="gloo")
stage = None if sys.argv[1] == "default" else int(sys.argv[1])
cfg = build_ds_config(micro_batch_size=2, grad_accum=1, grad_clip=1.0, zero_stage=stage, dtype="bf16")
torch.manual_seed(0)
model = MiniMindForCausalLM(get_preset("small-26m", vocab_size=512, max_position_embeddings=64))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
ids = torch.randint(0, 512, (2, 32))
for _ in range(2):
    engine.backward(engine(ids, targets=ids).loss)
    count = Count()
    with count:
        engine.step()
print("RESULT", json.dumps({"optimizer": type(engine.optimizer).__name__, "ops": sum(count.ops.values()),
                            "host_reads": count.ops["aten._local_scalar_dense"],
                            "params": len(list(model.parameters()))}))
"""


def step_ops(stage: str, port: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", COUNT_STEP_OPS, stage, str(port)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow  # ~30 s: two DeepSpeed start-ups
def test_default_bf16_step_reads_the_host_a_few_times_not_once_per_parameter():
    """What makes the bf16 default worth having on a GPU, where every host read waits for the queue to
    drain: its optimizer step is a handful of reads and a few hundred ops, where ZeRO 0's is a read and
    dozens of ops per parameter (counted here too, so the count is known to see them)."""
    default, zero0 = step_ops("default", 29671), step_ops("0", 29672)
    assert default["optimizer"] == "BF16_Optimizer" and zero0["optimizer"] == "FP16_UnfusedOptimizer"
    assert zero0["host_reads"] >= zero0["params"], zero0
    assert default["host_reads"] <= 10, default
    assert default["ops"] * 4 < zero0["ops"], (default, zero0)


@pytest.mark.parametrize("section, dtype", [({"fp16": {"enabled": False}}, "bf16"),
                                            ({"bf16": {"enabled": False}}, "fp16"),
                                            ({"fp16": {"loss_scale": 0}}, "fp16"),
                                            ({"bf16": {}}, "bf16")])
def test_a_file_that_enables_no_precision_keeps_the_flags(tmp_path, section, dtype):
    """A precision section that enables nothing (a template's `"fp16": {"enabled": false}`) leaves --dtype
    to the flag, as every other setting the file leaves out is; it used to train in fp32, silently."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(section))
    assert precision(build(dtype=dtype, user_file=str(path))) == dtype


def test_a_file_that_disables_the_flags_precision_wins(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": False}}))
    assert precision(build(dtype="bf16", user_file=str(path))) == "fp32"
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    cfg = build(dtype="fp16", user_file=str(path))
    assert precision(cfg) == "bf16" and not cfg.get("fp16", {}).get("enabled")


def test_a_deepspeed_config_path_that_is_a_directory_or_missing_is_named(tmp_path):
    from minimind_fast.training.ds_config import read_user_file

    with pytest.raises(ValueError, match="a directory, not a DeepSpeed config file"):
        read_user_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="ds.json: DeepSpeed config file not found"):
        read_user_file(tmp_path / "ds.json")
