"""Model directories: the consolidated weights every later stage, chat, export and serving load.

A model directory holds `model.safetensors` (full weights, tied output head stored once),
`model_config.json` (our `ModelConfig`) and the tokenizer's files. A training run directory holds
`checkpoints/step_NNNNNNNN/model/` (one model directory per checkpoint, beside DeepSpeed's state)
and `final/` (a model directory). `resolve_model_dir` turns any of these into the model directory to
load; `load_model` also accepts a MiniMind2 `.pth` file and a Hugging Face export (see `interop`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minimind_fast.config import SHAPE_FIELDS, ModelConfig
from minimind_fast.files import swap_into_place, temporary_sibling_dir
from minimind_fast.model import MiniMindForCausalLM

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def state_dict_for_saving(model: MiniMindForCausalLM) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with the tied output head dropped (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model_dir(
    model: MiniMindForCausalLM,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a model directory atomically (a temporary sibling renamed into place).

    `state_dict` overrides the model's own (the engine passes ZeRO-3-consolidated weights).
    """
    def write(tmp: Path) -> None:
        state = state_dict if state_dict is not None else state_dict_for_saving(model)
        if model.config.tie_word_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt", **(metadata or {})})
        model.config.save(tmp / CONFIG)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)

    return write_dir_atomically(Path(out_dir), write, is_model_dir)


def is_model_dir(path: Path) -> bool:
    return (path / CONFIG).exists()


def check_replaceable(out: Path, replaceable: Callable[[Path], bool]) -> None:
    """Refuse to replace an existing, non-empty directory that `replaceable` does not recognise, so a
    mistyped output path is never wiped by the replace-on-write below."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not replaceable(out):
        raise FileExistsError(f"{out}: exists and is not a directory of the kind being written; "
                              "refusing to replace it (choose another output path)")


def write_dir_atomically(out: Path, write: Callable[[Path], None], replaceable: Callable[[Path], bool]) -> Path:
    """Fill a temporary sibling of `out` with `write(tmp)`, then swap it into place.

    An existing `out` is renamed aside, not deleted, until the new one is in place, so a failure or a
    kill during the swap never leaves the output path without one whole directory behind it.
    """
    check_replaceable(out, replaceable)
    out = Path(os.path.abspath(out))  # `.` or `..` has no name or parent to put a sibling beside
    tmp = temporary_sibling_dir(out)
    try:
        write(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").exists():
        raise FileNotFoundError(f"{src}: no tokenizer.json (not a tokenizer directory)")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


# A training checkpoint (`RUN/checkpoints/step_NNNNNNNN/`) holding this file is whole (its writer's last act).
MARKER = "COMPLETE"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoints marked complete, oldest first: a `.tmp` one or one killed before its marker may be
    half-written."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step_*") if not d.name.endswith(".tmp") and (d / MARKER).exists())


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model directory in a model dir, a run dir (`final/` or newest checkpoint) or a checkpoint dir."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if (p / WEIGHTS).exists():
        return p
    if (p / "model" / WEIGHTS).exists():
        return p / "model"
    if (p / "final" / WEIGHTS).exists():
        return p / "final"
    ckpts = [d for d in complete_checkpoints(p) if (d / "model" / WEIGHTS).exists()]
    if ckpts:
        return ckpts[-1] / "model"
    raise FileNotFoundError(
        f"{p}: not a model directory ({WEIGHTS} + {CONFIG}), a run directory with final/ or "
        f"checkpoints/step_*/model/, a MiniMind .pth file or a Hugging Face export")


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    kernels: str | None = None,
) -> MiniMindForCausalLM:
    """Load weights from our model/run directory, a MiniMind2 `.pth`, or a Hugging Face export.

    `kernels` (auto|triton|reference) picks the op table; by default "auto", whatever the saved config
    says, since that was the choice of the machine that trained the model.
    """
    p = Path(path)
    if p.suffix == ".pth":
        from minimind_fast import interop

        model = interop.load_minimind_pth(p)
    elif is_hf_dir(p):
        from minimind_fast import interop

        model = interop.load_hf_dir(p)
    else:
        model_dir = resolve_model_dir(p)
        # `kernels` was the saving machine's runtime choice (a GPU run's "triton" fails on a CPU); unless
        # asked for here, this machine picks its own.
        config = ModelConfig.load(model_dir / CONFIG, SHAPE_FIELDS).replace(kernels=kernels or "auto")
        model = MiniMindForCausalLM(config)
        load_state(model, read_safetensors(model_dir / WEIGHTS), source=str(model_dir / WEIGHTS))
    if kernels is not None:
        model = rebuild_with_kernels(model, kernels)
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


# Settings of how a model runs, not of what it computes: a fingerprint leaves them out.
RUNTIME_FIELDS = ("kernels", "gradient_checkpointing", "dropout")  # how it trains or runs, not what it computes


def weights_fingerprint(model: torch.nn.Module, ignore: tuple[str, ...] = ()) -> str:
    """sha256 of a model's architecture (its config without `RUNTIME_FIELDS` and `ignore`) and every tensor
    of its state dict (name, dtype, shape, bytes): the same value means the same function."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        fields = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_FIELDS + ignore}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or foreign one raises ValueError naming it."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated") from e


def tokenizer_dir_beside(src: Path) -> Path | None:
    """The tokenizer directory stored with weights: next to a `.pth`, in a model or Hugging Face directory,
    or in a run's model directory; None when there is none."""
    candidates = [src] if src.is_dir() else [src.parent]
    if src.is_dir() and not is_hf_dir(src):
        try:
            candidates.append(resolve_model_dir(src))
        except FileNotFoundError:
            pass
    return next((c for c in candidates if (c / "tokenizer.json").exists()), None)


def load_failure(e: Exception) -> str:
    """torch.load's failure in one line: its type and `load_failure_reason`."""
    reason = load_failure_reason(e)
    return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


def load_failure_reason(e: Exception) -> str:
    """torch.load's reason in one line. A weights-only refusal puts it on a later line, after advice on
    loading the file as trusted code, which is not ours to pass on."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    return reason.removeprefix("WeightsUnpickler error: ").split(" Please use")[0]


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face export: a config.json naming its architectures (our run dirs' config.json does not)."""
    config = path / "config.json"
    if not path.is_dir() or not config.exists() or (path / CONFIG).exists():
        return False
    try:
        data = json.loads(config.read_text())
        return isinstance(data, dict) and "architectures" in data
    except ValueError:  # not JSON, or not UTF-8: with weights beside it, a damaged export (its loader names it)
        return any((path / name).exists() for name in (WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin"))


def load_state(model: MiniMindForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that lists every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    untied = []
    if model.config.tie_word_embeddings:
        untied = _untied_head(state)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} != model {tuple(expected[k].shape)}"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes or untied:
        lines = [f"{source}: weights do not match the model config"]
        lines += [f"  missing: {k}" for k in missing[:20]] + [f"  unexpected: {k}" for k in unexpected[:20]]
        lines += [f"  shape: {s}" for s in shapes[:20]] + untied
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=False)


def _untied_head(state: dict[str, torch.Tensor]) -> list[str]:
    """The error line for a file whose output head is its own matrix while the config ties it to the
    embedding: loading would drop that head and silently give another model."""
    head, emb = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is None or emb is None or (head.shape == emb.shape and torch.equal(head, emb)):
        return []
    return ["  tied: lm_head.weight differs from model.embed_tokens.weight, but tie_word_embeddings=true "
            "(the weights are of an untied model: set tie_word_embeddings false)"]


def rebuild_with_kernels(model: MiniMindForCausalLM, kernels: str) -> MiniMindForCausalLM:
    """The same weights in a model whose op table is `kernels` (auto|triton|reference)."""
    if model.config.kernels == kernels:
        return model
    new = MiniMindForCausalLM(model.config.replace(kernels=kernels))
    new.load_state_dict(model.state_dict())
    return new
