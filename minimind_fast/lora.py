"""LoRA adapters: low-rank updates `W + (alpha / r) * B @ A` on chosen linear projections.

Unlike MiniMind's LoRA (rank hard-coded, no alpha, square layers only), any `nn.Linear` whose name
ends with one of `target_modules` gets an adapter, whatever its shape, so under GQA k_proj and v_proj
are adapted too. MoE routed experts (`ExpertBank`, stacked weights rather than nn.Linear) are adapted per
expert when gate_proj, up_proj or down_proj is a target, as MiniMind's LoRA adapts each expert's
projections (`LoraExpertBank`). Base weights are frozen (`requires_grad=False`), so they never enter optimizer state.
Adapters are saved apart in a small safetensors file with their settings, loaded at chat time, and
merged into the base weights for export.

A LoRA training run keeps the frozen base weights in each model directory it writes and the adapter
beside them in its `adapter/` subdirectory (`RUN/final/adapter/`, `RUN/checkpoints/step_N/model/adapter/`);
`resolve_adapter_dir` finds the newest adapter from a run, checkpoint, model or adapter directory.
Named as a model (chat, serving, export, a later stage's --init, --reference or --teacher), such a
directory means the fine-tuned model: `load_tuned_model` merges the adapter kept beside the base.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minimind_fast.checkpoint import complete_checkpoints, is_hf_dir, load_model, read_safetensors, resolve_model_dir
from minimind_fast.files import apply_umask
from minimind_fast.model import ExpertBank

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise ValueError(f"LoRA alpha must be a number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, list) or not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(f"LoRA target_modules must be a list of module names, got {self.target_modules!r}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty")

    @classmethod
    def load(cls, path: Path) -> LoraConfig:
        """The settings in an adapter_config.json; a malformed one raises ValueError naming the file."""
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, found {type(data).__name__}")
            unknown = sorted(set(data) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"unknown field(s) {unknown} (not an adapter written by this project)")
            return cls(**data)
        except ValueError as e:  # json.JSONDecodeError is one
            raise ValueError(f"{path}: {e}") from e

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (B starts at zero, so at the base)."""

    def __init__(self, base: nn.Linear, config: LoraConfig):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features,
                                               device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank,
                                               device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        # at least fp32 (a bf16 sum would round the small update away), never below the weight's precision
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        return (self.base.weight.to(dtype) + delta).to(self.base.weight.dtype)


class LoraExpertBank(nn.Module):
    """A frozen `ExpertBank` plus, for each targeted projection, one low-rank update per expert:
    W_e + (alpha / r) * B_e @ A_e, with A (E, r, in) and B (E, out, r), initialised as `LoraLinear`'s.

    The MoE ops take whole weight stacks, so the update is added to the weights (one batched matmul over
    the experts) and gradients reach A and B through the unchanged kernels; the price is one adapted copy
    of the expert weights per layer, held for backward. LoRA dropout acts on a projection's input, which
    the fused expert kernels never expose, so it does not apply here (the dense projections keep it).
    """

    def __init__(self, base: ExpertBank, config: LoraConfig, projections: list[str]):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scaling = config.scaling
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in projections:
            w = getattr(base, name)
            n_experts, out_features, in_features = w.shape
            a = torch.empty(n_experts, config.rank, in_features, device=w.device, dtype=w.dtype)
            for expert_a in a:  # per expert: kaiming on the 3-D stack would take r * in as the fan-in
                nn.init.kaiming_uniform_(expert_a, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(n_experts, out_features, config.rank,
                                                         device=w.device, dtype=w.dtype))

    def merged_weight(self, name: str) -> torch.Tensor:
        """Projection `name`'s stack with its update, as `LoraLinear.merged_weight` forms it."""
        w = getattr(self.base, name)
        if name not in self.lora_A:
            return w
        dtype = torch.promote_types(w.dtype, torch.float32)
        delta = torch.bmm(self.lora_B[name].to(dtype), self.lora_A[name].to(dtype)) * self.scaling
        return (w.to(dtype) + delta).to(w.dtype)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.merged_weight(name) for name in EXPERT_PROJECTIONS)


def is_expert_adapter_key(key: str) -> bool:
    """Whether an adapter key is a routed-expert adapter (`...mlp.experts.lora_A.gate_proj`)."""
    # LoraLinear's keys end in `.lora_A`/`.lora_B`; a LoraExpertBank's name the projection after them
    return ".lora_A." in key or ".lora_B." in key


def _expert_targets(model: nn.Module, config: LoraConfig) -> list[tuple[nn.Module, str, ExpertBank]]:
    if not any(t in EXPERT_PROJECTIONS for t in config.target_modules):
        return []
    return [(module, child_name, child) for module in model.modules()
            for child_name, child in module.named_children() if isinstance(child, ExpertBank)]


def _targets(model: nn.Module, config: LoraConfig) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child_name in config.target_modules:
                found.append((module, child_name, child))
        del name
    return found


def apply_lora(model: nn.Module, config: LoraConfig, experts: bool = True) -> list[str]:
    """Freeze every base parameter and wrap the target projections (the MoE routed experts' too unless
    `experts` is False); returns the adapted module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = _targets(model, config)
    banks = _expert_targets(model, config) if experts else []
    if not targets and not banks:
        raise ValueError(f"no projection named any of {config.target_modules} in the model")
    for parent, child_name, child in targets:
        setattr(parent, child_name, LoraLinear(child, config))
    projections = [t for t in EXPERT_PROJECTIONS if t in config.target_modules]
    for parent, child_name, bank in banks:
        setattr(parent, child_name, LoraExpertBank(bank, config, projections))
    model.lora_config = config
    return [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExpertBank))]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without adapters, keys as in the plain model (merged adapters if any)."""
    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            merged[f"{name}.weight"] = module.merged_weight().detach()
        elif isinstance(module, LoraExpertBank):
            for proj in module.lora_A:
                merged[f"{name}.{proj}"] = module.merged_weight(proj).detach()
    state = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        key = k.replace(".base.", ".")
        state[key] = merged.get(key, v)
    return state


def split_adapters(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(frozen base weights under the plain model's keys, adapter weights) of a state dict.

    Unlike `base_state_dict` nothing is merged: the checkpointer stores the base as it was loaded, so
    that an adapter can be applied to it, merged into it, or dropped.
    """
    base = {k.replace(".base.", "."): v for k, v in state.items() if ".lora_" not in k}
    adapters = {k: v.contiguous() for k, v in state.items() if ".lora_" in k}
    return base, adapters


def save_lora(model: nn.Module, out_dir: str | os.PathLike,
              state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `adapter.safetensors` + `adapter_config.json` (the adapters only, a few MB at most).

    `state` overrides the model's own adapter weights (ZeRO-3 checkpoints pass gathered ones).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: LoraConfig = model.lora_config
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    save_file(state if state is not None else lora_state_dict(model), tmp)
    apply_umask(Path(tmp))
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    tmp_cfg = out / f"{ADAPTER_CONFIG}.tmp"
    tmp_cfg.write_text(json.dumps(asdict(config), indent=2))
    os.replace(tmp_cfg, out / ADAPTER_CONFIG)
    return out


def _is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).exists() or (path / ADAPTER_WEIGHTS).exists()


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The adapter in an adapter dir, a model dir (`adapter/`), a checkpoint dir (`model/adapter/`) or a
    LoRA run dir (`final/adapter/`, else the newest checkpoint's), so chat and merge take a run dir."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such LoRA adapter, run or checkpoint directory")
    for candidate in (p, p / ADAPTER_DIR, p / "model" / ADAPTER_DIR, p / "final" / ADAPTER_DIR):
        if _is_adapter_dir(candidate):
            return candidate
    ckpts = [d for d in complete_checkpoints(p) if _is_adapter_dir(d / "model" / ADAPTER_DIR)]
    if ckpts:
        return ckpts[-1] / "model" / ADAPTER_DIR
    raise FileNotFoundError(f"{p}: no LoRA adapter there ({ADAPTER_WEIGHTS} + {ADAPTER_CONFIG}, in it, in "
                            f"{ADAPTER_DIR}/, final/{ADAPTER_DIR}/ or checkpoints/step_*/model/{ADAPTER_DIR}/)")


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Wrap `model` with the adapters saved in `adapter_dir` (in place) and load their weights.

    `adapter_dir` may also be a LoRA run, checkpoint or model directory (see `resolve_adapter_dir`).
    """
    adapter_dir = resolve_adapter_dir(adapter_dir)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (adapter_dir / name).exists():
            raise FileNotFoundError(f"{adapter_dir}: missing {name} (not a LoRA adapter directory)")
    config = LoraConfig.load(adapter_dir / ADAPTER_CONFIG)
    state = read_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    # Adapters saved before the routed experts took LoRA list gate/up/down_proj among their targets
    # but hold no expert weights: they adapted the dense (and shared-expert) projections only.
    apply_lora(model, config, experts=any(is_expert_adapter_key(k) for k in state))
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad_shape = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: adapter does not fit the model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shape {bad_shape[:5]})")
    model.load_state_dict(state, strict=False)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it (in place); the result is a plain model."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                with torch.no_grad():
                    child.base.weight.copy_(child.merged_weight())
                setattr(parent, child_name, child.base)
            elif isinstance(child, LoraExpertBank):
                with torch.no_grad():
                    for proj in child.lora_A:
                        getattr(child.base, proj).copy_(child.merged_weight(proj))
                setattr(parent, child_name, child.base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_beside(path: str | os.PathLike) -> Path | None:
    """The adapter a LoRA run keeps beside its base weights (`MODEL_DIR/adapter/`) when `path` is such a
    run, checkpoint or model directory; None for any other model (a .pth, a Hugging Face export...)."""
    p = Path(path)
    if p.suffix == ".pth" or not p.is_dir() or is_hf_dir(p):
        return None
    adapter = resolve_model_dir(p) / ADAPTER_DIR
    return adapter if adapter.is_dir() else None


def load_tuned_model(path: str | os.PathLike, lora: str | os.PathLike | None = None,
                     kernels: str | None = None) -> tuple[nn.Module, Path | None]:
    """`checkpoint.load_model(path)` with a LoRA adapter merged into the weights: `lora` when given
    ("none" or "": no adapter), else the one a LoRA run keeps beside its base (see `adapter_beside`).
    Returns the plain model and the adapter directory merged (None when none was)."""
    model = load_model(path, kernels=kernels)
    if lora is not None and str(lora) in ("", "none"):
        return model, None
    adapter = resolve_adapter_dir(lora) if lora is not None else adapter_beside(path)
    if adapter is None:
        return model, None
    return merge_lora(load_lora(model, adapter)), adapter
