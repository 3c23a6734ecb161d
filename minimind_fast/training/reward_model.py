"""A learnt reward model: the decoder plus a scalar head, trained on preference pairs, then used as one
more reward term in GRPO and PPO (`--reward-model PATH[:WEIGHT]`).

The score of a sequence is `head(h_last)`, `h_last` the final hidden state (after the last norm) at the
sequence's last real token: the reply's end, which has read the prompt and the whole reply. Training is
Bradley-Terry on DPO's pair shards:

    loss = mean over pairs of -log sigmoid(r_chosen - r_rejected)  +  center_coef * mean((r_c + r_r)^2)

The first term only sees differences, so scores may drift by any constant; the second (`--center-coef`,
default 0.01, as Eisenstein et al. 2023 and TRL's RewardTrainer suggest) keeps them near zero, which
matters once a score is added to rule-based rewards in [0, 1] or is PPO's raw terminal reward (GRPO's
group-normalised advantages would not mind an offset). val_loss is the Bradley-Terry term alone over
the held-out pairs.

The head trains in the module DeepSpeed wraps and is saved apart (heads.py): each checkpoint's `model/`
is a plain model that chat loads, with `reward_head.safetensors` beside it; that file is what makes a
model directory a reward model. There is no reference model.

At RL time `RewardScorer` renders prompt + reply exactly as the DPO shards render a conversation
(`records.conversation_doc`, the chat template, the reply closed by `<|im_end|>`) and encodes it as
tokenize.py does (`pipeline.doc_ids`: text spelling a control token is text), so the model scores the token
ids it was trained on. `--reward-model` also takes a
Hugging Face sequence-classification reward model, which reads the replies as text (hf_reward.py).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minimind_fast.checkpoint import is_hf_dir, load_model, read_safetensors, resolve_model_dir, weights_fingerprint
from minimind_fast.data.pipeline import doc_ids, prompt_ids
from minimind_fast.data.records import conversation_doc
from minimind_fast.data.tokenizer import ChatTokenizer, load_tokenizer, unmarked
from minimind_fast.model import MiniMindForCausalLM
from minimind_fast.training.dpo import PairStage, concat_pairs
from minimind_fast.training.flops import head_matmul_params
from minimind_fast.training.heads import OwnHead, attach_scalar_head
from minimind_fast.training.hf_reward import HFRewardScorer
from minimind_fast.training.rewards import ReplyScorer, split_weight
from minimind_fast.training.stages import check_resumed_objective, freeze, save_objective

REWARD_HEAD = "reward_head"  # the attribute on the model, and its keys' prefix in the state dict
REWARD_HEAD_FILE = "reward_head.safetensors"  # in a checkpoint's model/ (keys `weight`, `bias`)
DEFAULT_CENTER_COEF = 0.01
# Initial scores ~ N(0, HEAD_INIT_SCALE^2) at any width (the final norm's outputs are ~1 per feature):
# near zero, so the loss starts near log 2, yet not all equal, so the trunk gets a gradient at step 1.
HEAD_INIT_SCALE = 0.1


# ------------------------------------------------------------------------------------- the maths

def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor,
                     position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the head's score at each row's last real token `lengths - 1`, in fp32 at least: (N,), the MoE aux
    loss). Rows are right-padded: causal attention keeps the padding out of every real position."""
    out = model(input_ids=input_ids, position_ids=position_ids, logits_to_keep=1)  # logits are not needed
    rows = torch.arange(input_ids.shape[0], device=out.hidden_states.device)
    last = out.hidden_states[rows, lengths.to(rows.device) - 1]
    scores = getattr(getattr(model, "module", model), REWARD_HEAD)(last).squeeze(-1)
    return scores.to(torch.promote_types(scores.dtype, torch.float32)), out.aux_loss


def pair_rewards(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(chosen scores, rejected scores, aux loss) of a `DPOLoader` batch, both sides in one forward."""
    ids, _, positions = concat_pairs(batch)
    lengths = torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]])
    scores, aux = sequence_rewards(model, ids, lengths, positions)
    n = batch["chosen_input_ids"].shape[0]
    return scores[:n], scores[n:], aux


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float = 0.0
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean -log sigmoid(r_c - r_r) over the pairs, plus center_coef * mean((r_c + r_r)^2); the metrics
    (detached 0-dim tensors) are the Bradley-Terry term alone and the scores' statistics."""
    margin = chosen - rejected
    bt = -F.logsigmoid(margin).mean()
    loss = bt + center_coef * ((chosen + rejected) ** 2).mean() if center_coef else bt
    metrics = {"bt_loss": bt, "accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
               "reward_chosen": chosen.mean(), "reward_rejected": rejected.mean()}
    return loss, {k: v.detach() for k, v in metrics.items()}


# -------------------------------------------------------------------------------------- the stage

class RewardModelStage(OwnHead, PairStage):
    """A reward model on preference pairs (DPO shards): the decoder plus a scalar head, Bradley-Terry loss."""

    name = "reward_model"
    head_name, head_file = REWARD_HEAD, REWARD_HEAD_FILE

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("reward model")
        g.add_argument("--center-coef", type=float, default=DEFAULT_CENTER_COEF,
                       help="weight of mean((r_chosen + r_rejected)^2), which keeps the scores centred on 0")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        if not 0 <= args.center_coef < math.inf:  # written so that NaN fails too
            raise ValueError(f"--center-coef {args.center_coef}: must be >= 0 and finite")

    def setup(self, model: MiniMindForCausalLM) -> None:
        """The head, before DeepSpeed wraps the model (a resume then loads its trained weights)."""
        self.model_config = model.config  # for `flops_in_batch`
        attach_scalar_head(model, REWARD_HEAD, std=HEAD_INIT_SCALE / math.sqrt(model.config.hidden_size),
                           seed=self.args.seed)
        check_resumed_objective(self.resume_from, "reward-model objective", self._objective(),
                                {"center_coef": "--center-coef"})

    def _objective(self) -> dict:
        return {"center_coef": self.args.center_coef}

    def flops_per_token(self, model: MiniMindForCausalLM) -> float:
        """The trunk's forward and backward: the output head runs at one position a row (`flops_in_batch`)."""
        return super().flops_per_token(model) - 6 * head_matmul_params(model.config)

    def flops_in_batch(self, batch: dict, per_token: float) -> float:
        """The trunk at every position, and at each row's one read position the output head's forward (the
        logits no loss reads: `sequence_rewards`' logits_to_keep=1) and the scalar head's forward and backward."""
        rows = 2 * batch["chosen_input_ids"].shape[0]
        config = self.model_config
        return per_token * self.tokens_in_batch(batch) + rows * (2 * head_matmul_params(config)
                                                                 + 6 * config.hidden_size)

    def save_extra(self, model: MiniMindForCausalLM, out_dir: Path) -> None:
        save_objective(out_dir, self._objective())

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected, aux = pair_rewards(model, batch)
        loss, metrics = bradley_terry_loss(chosen, rejected, self.args.center_coef)
        if aux is not None and self.uses_moe(model):
            loss = loss + aux
            metrics["aux_loss"] = aux.detach().float()
        return loss, metrics

    def eval_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The Bradley-Terry loss of held-out pairs (the engine logs it as val_loss)."""
        return self.eval_metrics(model, batch)[0]

    def eval_metrics(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The Bradley-Terry loss of held-out pairs, and how often and by how much chosen outscores rejected."""
        chosen, rejected, _ = pair_rewards(model, batch)
        loss, metrics = bradley_terry_loss(chosen, rejected)
        return loss, {k: metrics[k] for k in ("accuracy", "margin")}


# ------------------------------------------------------------------------------------- the scorer

def reward_model_dir(path: str | Path) -> Path:
    """The model directory of a reward-model run, checkpoint or model dir; refuses a plain model."""
    model_dir = resolve_model_dir(path)  # FileNotFoundError naming the path
    if not (model_dir / REWARD_HEAD_FILE).exists():
        raise ValueError(f"{path}: a plain model without a reward head (no {REWARD_HEAD_FILE} in {model_dir}); "
                         f"train a reward model with launch/reward_model.py")
    if not (model_dir / "tokenizer.json").exists():
        raise ValueError(f"{path}: no tokenizer.json in {model_dir}, so the tokenizer it was trained with is "
                         "unknown")
    return model_dir


class RewardScorer(ReplyScorer):
    """A trained reward model that scores (prompt messages, reply) pairs: frozen, eval mode, no_grad."""

    def __init__(self, path: str | Path, kernels: str | None = None):
        self.path = Path(path)
        self.model_dir = reward_model_dir(path)
        self.tokenizer = load_tokenizer(self.model_dir)
        model = load_model(self.model_dir, kernels=kernels)  # safetensors only: no pickle is unpickled
        head = attach_scalar_head(model, REWARD_HEAD)
        head_file = self.model_dir / REWARD_HEAD_FILE
        try:
            head.load_state_dict(read_safetensors(head_file))
        except RuntimeError as e:  # other keys or shapes: a head of another model
            raise ValueError(f"{head_file}: not this model's reward head ({e})") from None
        self.model = freeze(model)

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> RewardScorer:
        self.model.to(device=device, dtype=dtype)
        return self

    def fingerprint(self) -> str:
        """The weights (head included) and architecture, for a resume's check of its objective."""
        return weights_fingerprint(self.model)

    def template_tokens(self, messages: list[dict]) -> int:
        """Tokens the chat template adds after the prompt around a reply (`<|im_end|>\\n` for ChatML)."""
        return len(self.sequence_ids(messages, "", truncate=False)) - len(prompt_ids(self.tokenizer, messages))

    def sequence_ids(self, messages: list[dict], completion: str | list[int], truncate: bool = True) -> list[int]:
        """The ids of prompt + reply exactly as a DPO shard holds the conversation (`conversation_doc`,
        `pipeline.doc_ids`: text that spells a control token is text), cut to the context as the pair loader
        cuts to --seq-len. A reply given as sampled ids loses its stop token (the template closes the reply);
        it is scored as its text: a control token sampled inside it (`<|im_start|>`) reads as the characters
        it is made of, as a DPO reply quoting it was encoded. Its ids may then differ from the sampled ones,
        but the reward model never saw a control token inside a reply, and splicing the sampled one in would
        let a reply open a turn of its own in the conversation it is scored in."""
        tok = self.tokenizer
        if not isinstance(completion, str):
            ids = list(completion)
            if ids and ids[-1] == tok.eos_token_id:
                ids = ids[:-1]
            completion = tok.decode(ids, skip_special_tokens=False)
        # a sampled reply may hold the noncharacter that a DPO record may not (it marks quoted control tokens)
        completion = unmarked(completion)
        doc = conversation_doc([*messages, {"role": "assistant", "content": completion}], tok, tags=False)
        [ids] = doc_ids(tok, [doc])
        return ids[:self.context] if truncate else ids

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def score_padded(self, ids: torch.Tensor, lengths: torch.Tensor) -> list[float]:
        device = next(self.model.parameters()).device
        return sequence_rewards(self.model, ids.to(device), lengths.to(device))[0].tolist()


# ------------------------------------------------------------------------------- as an RL reward

@dataclass
class ModelReward:
    """`--reward-model PATH[:WEIGHT]`: the scorer and the weight of its term in the total reward."""

    scorer: ReplyScorer
    weight: float
    path: str


def load_model_reward(spec: str, policy_tokenizer: ChatTokenizer, seq_len: int, kernels: str | None,
                      prompts: list[list[dict]]) -> ModelReward:
    """The reward model `spec` names, checked at start-up on the run's `prompts`: one of ours
    (see `own_scorer`) or a Hugging Face sequence-classification model (hf_reward.py), told apart by the
    directory's files (model_config.json + reward_head.safetensors, or a config.json naming architectures)."""
    path, weight = split_weight(spec)
    flag = f"--reward-model {spec}"
    if not Path(path).exists():
        raise FileNotFoundError(f"{flag}: no such file or directory")
    try:
        if is_hf_dir(Path(path)):
            scorer = HFRewardScorer(path, policy_tokenizer)
            scorer.check(prompts)
        else:  # its template's close is the same after any prompt
            scorer = own_scorer(path, policy_tokenizer, seq_len, kernels, prompts[0])
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{flag}: {e}") from None
    return ModelReward(scorer, weight, path)


def own_scorer(path: str, policy_tokenizer: ChatTokenizer, seq_len: int, kernels: str | None,
               example: list[dict]) -> RewardScorer:
    """A reward model of launch/reward_model.py, which scores the policy's ids as they are: it must read the
    policy's tokenizer, and its context hold --seq-len tokens of prompt + completion plus the template's
    close (measured on `example`)."""
    scorer = RewardScorer(path, kernels=kernels)
    mine, theirs = policy_tokenizer, scorer.tokenizer
    if mine.fingerprint != theirs.fingerprint:
        raise ValueError(f"the reward model was trained with tokenizer {theirs.fingerprint} ({theirs.dir}), "
                         f"the policy uses {mine.fingerprint} ({mine.dir}); it would score ids of another "
                         "vocabulary: train the reward model from a model with the policy's tokenizer")
    needed = seq_len + scorer.template_tokens(example)
    if scorer.context < needed:
        raise ValueError(f"its context length {scorer.context} (max_position_embeddings) cannot hold "
                         f"--seq-len {seq_len} tokens of prompt + completion plus the template's "
                         f"{needed - seq_len} closing token(s): lower --seq-len to {scorer.context - needed + seq_len}")
    return scorer
