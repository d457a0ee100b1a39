"""LoRA training on the dataset: supervised on desirable replies, KTO-style on undesirable ones.

One loop, two losses per example: desirable completions (liked, corrections, agent and FAQ answers) get
the mean negative log-likelihood of their tokens; undesirable ones (disliked) get KTO's unpaired
loss with the reference point at zero, `sigmoid(beta * (log p - log p_ref))`, which pushes their
likelihood below the base model's and then stops pushing (plain unlikelihood would wreck the model).
The reference log-probs come from the same model with the adapter disabled, computed once up front.

Why not TRL's SFTTrainer/KTOTrainer: on 2 shared CPU cores every forward pass counts. KTO there runs
the reference model and a mismatched-pair KL pass on every step (3x the compute of this loop), and its
Trainer machinery owns checkpoints and output dirs; here a version must appear atomically in the
registry's directory with its lineage, and a resumed run must reproduce the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dialogue.settings import Settings
from memory.errors import InvalidInput, RapportError
from memory.loading import BUILD_LOCK
from training.datasets import Dataset, Example
from training.anchors import anchor_conversations
from training.scoring import (Encoded, collate, completion_logprobs, encode, greedy_replies, load_base,
                              next_token_logprobs, set_threads)

logger = logging.getLogger(__name__)

class TrainingInterrupted(RapportError):
    """Training stopped before its last step; running it again resumes from the checkpoint."""


TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """One training job's knobs; stored in train_meta.json with the result."""

    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
    top_layers: int | None = field(default=12, metadata={"help": "adapt only the top N decoder layers; None = all"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training examples"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps (overrides epochs)"})
    batch_size: int = field(default=8, metadata={"help": "examples per optimizer step"})
    max_len: int = field(default=384, metadata={"help": "tokens per example (prompt is cut from the left)"})
    kto_beta: float = field(default=0.1, metadata={"help": "KTO beta for undesirable replies"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "weight of the undesirable loss"})
    anchor_weight: float = field(default=1.0, metadata={
        "help": "weight of the KL to the base model on the anchor prompts (training/anchors.py); 0 = off"})
    warmup_fraction: float = field(default=0.06, metadata={"help": "linear warm-up, then linear decay"})
    seed: int = field(default=0, metadata={"help": "data order and LoRA init"})
    checkpoint_every: int = field(default=10, metadata={"help": "steps between resumable checkpoints"})

    def run_key(self, dataset_hash: str) -> str:
        import hashlib

        return hashlib.sha256(json.dumps([dataset_hash, asdict(self)], sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    """A trained adapter in a temp dir inside the adapters dir, ready to be claimed as a version."""

    path: Path
    metrics: dict[str, Any]
    config: TrainConfig


def lora_config(config: TrainConfig, num_layers: int):
    from peft import LoraConfig

    layers = None
    if config.top_layers and config.top_layers < num_layers:
        layers = list(range(num_layers - config.top_layers, num_layers))
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=TARGET_MODULES,
                      layers_to_transform=layers, bias="none", task_type="CAUSAL_LM")


def schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(total - warmup, 1))


def batch_order(n: int, batch_size: int, total_steps: int, seed: int) -> list[list[int]]:
    """Example indices of every step: a fresh seeded shuffle per epoch; the same list on every resume."""
    order: list[list[int]] = []
    epoch = 0
    while len(order) < total_steps:
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(n, generator=generator).tolist()
        order += [perm[i:i + batch_size] for i in range(0, n, batch_size)]
        epoch += 1
    return order[:total_steps]


def checkpoint_dir(settings: Settings, key: str) -> Path:
    return settings.adapters_dir / ".checkpoints" / key


def save_checkpoint(path: Path, state: dict[str, Any], users: list[str]) -> None:
    """Written to a temp file and renamed: an interruption mid-write leaves the previous checkpoint whole. The run's
    user hashes (`users`) go beside it first, so `adapters purge` finds a checkpoint holding an erased user."""
    path.mkdir(parents=True, exist_ok=True)
    write_meta(path, {"lineage": {"user_hashes": users}})
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    try:
        return torch.load(path / "state.pt", weights_only=True)  # tensors and plain data only: no code runs on load
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None


def progress_bar(show: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tok_s]} tok/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not show)


def library_versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def reference_logprobs(model, encoded: list[Encoded], examples: list[Example], pad_id: int, batch_size: int) -> list[float]:
    """log p_ref(completion) for undesirable examples (0 for the rest), from the model without its adapter."""
    refs = [0.0] * len(examples)
    todo = [i for i, e in enumerate(examples) if not e.desirable]
    with torch.no_grad(), model.disable_adapter():
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            sums, _ = completion_logprobs(model, collate([encoded[i] for i in chunk], pad_id))
            for i, value in zip(chunk, sums.tolist()):
                refs[i] = value
    return refs


_ANCHORS: dict[tuple, list[Encoded]] = {}


def anchor_encoded(model, tokenizer, settings: Settings, max_len: int) -> list[Encoded]:
    """The anchor prompts with the base model's own greedy replies (those that ended, or are empty, with their
    end-of-turn token, so every anchor holds at least the reply's first distribution), generated once a process
    for the search's trials."""
    key = (str(settings.model), str(settings.models_dir), settings.system_prompt, max_len)
    if key not in _ANCHORS:
        conversations = anchor_conversations(settings.system_prompt)
        with model.disable_adapter():
            replies = greedy_replies(model, tokenizer, conversations, max_new_tokens=96, repetition_penalty=1.1,
                                     batch_size=16)
        _ANCHORS[key] = [encode(tokenizer, m, text, max_len=max_len, end=done or not text)
                         for m, (text, done) in zip(conversations, replies)]
    return _ANCHORS[key]


def anchor_kl(model, batch) -> torch.Tensor:
    """Mean KL(base model ‖ adapter) of the next-token distributions over the anchor replies' tokens."""
    with torch.no_grad(), model.disable_adapter():
        reference, _ = next_token_logprobs(model, batch)
    logp, scored = next_token_logprobs(model, batch)
    kl = (reference.exp() * (reference - logp)).sum(-1)  # (B, K-1)
    return (kl * scored).sum() / scored.sum().clamp(min=1)


def train_adapter(settings: Settings, dataset: Dataset, config: TrainConfig, *, show_progress: bool = True,
                  stop_after: int | None = None) -> TrainResult:
    """Train a LoRA adapter on `dataset.train`; resumes a matching interrupted run from its checkpoint.

    `stop_after` ends the run early after that many steps (leaving the checkpoint), as an interruption would.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    examples = dataset.train
    if not examples:
        raise InvalidInput("nothing to train on: no rated turns, corrections, agent replies or FAQ entries")
    set_threads(settings)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    base, tokenizer = load_base(settings)
    with BUILD_LOCK:
        model = get_peft_model(base, lora_config(config, base.config.num_hidden_layers))
    anchors = anchor_encoded(model, tokenizer, settings, config.max_len) if config.anchor_weight else []
    model.train()
    encoded = [encode(tokenizer, e.messages, e.completion, max_len=config.max_len) for e in examples]
    pad_id = tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = config.max_steps or max(1, round(steps_per_epoch * config.epochs))
    order = batch_order(len(examples), config.batch_size, total, config.seed)
    anchor_order = batch_order(len(anchors), config.batch_size, total, config.seed + 1) if anchors else []
    warmup = max(1, round(total * config.warmup_fraction))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total, warmup))

    ckpt = checkpoint_dir(settings, config.run_key(dataset.hash))
    state = load_checkpoint(ckpt)
    step, losses, tokens_done, anchor_kls = 0, [], 0, []
    if state is not None and state.get("total") == total:
        set_peft_model_state_dict(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses, tokens_done = state["step"], state["losses"], state["tokens"]
        logger.info("resuming training at step %d of %d from %s", step, total, ckpt)
    refs = reference_logprobs(model, encoded, examples, pad_id, config.batch_size)

    loop_started, loop_tokens = time.perf_counter(), 0
    with progress_bar(show_progress) as progress:
        task = progress.add_task("train", total=total, completed=step, loss="-", tok_s="-")
        while step < total:
            idx = order[step]
            batch = collate([encoded[i] for i in idx], pad_id)
            sums, counts = completion_logprobs(model, batch)
            desirable = torch.tensor([examples[i].desirable for i in idx])
            ref = torch.tensor([refs[i] for i in idx])
            nll = -sums / counts.clamp(min=1)  # (B,) mean over each reply's tokens
            kto = torch.sigmoid(config.kto_beta * (sums - ref))  # (B,) → 0 as the reply becomes unlikely
            weight = torch.tensor([examples[i].weight for i in idx])  # (B,) cleaning's down-weights, source trust
            loss = (weight * torch.where(desirable, nll, config.undesirable_weight * kto)).mean()  # the pool's
            total_loss = loss
            if anchors:
                kl = anchor_kl(model, collate([anchors[i] for i in anchor_order[step]], pad_id))
                anchor_kls.append(round(kl.item(), 5))
                total_loss = loss + config.anchor_weight * kl
            total_loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(loss.item(), 5))
            batch_tokens = int(batch.attention_mask.sum())
            tokens_done += batch_tokens
            loop_tokens += batch_tokens
            rate = loop_tokens / max(time.perf_counter() - loop_started, 1e-9)
            progress.update(task, completed=step, loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
            if step % 10 == 0:
                logger.info("step %d/%d loss %.3f %.0f tok/s", step, total, losses[-1], rate)
            if step % config.checkpoint_every == 0 or step == total or (stop_after and step >= stop_after):
                save_checkpoint(ckpt, {"lora": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "step": step, "total": total,
                                       "losses": losses, "tokens": tokens_done},
                                dataset.lineage()["user_hashes"])
            if stop_after and step >= stop_after and step < total:
                raise TrainingInterrupted(f"stopped after step {step} of {total}; the checkpoint is kept")

    wall = time.perf_counter() - started
    loop_wall = time.perf_counter() - loop_started
    tail = losses[-max(1, min(10, len(losses) // 4)):]
    metrics = {
        "steps": total, "examples": len(examples), "epochs": round(total / steps_per_epoch, 2),
        "train_tokens": tokens_done, "completion_tokens": int(sum(e.n_completion for e in encoded)),
        "loss_first": losses[0], "loss_last": round(sum(tail) / len(tail), 5),
        "tokens_per_s": round(loop_tokens / max(loop_wall, 1e-9), 1), "wall_s": round(wall, 1),
        "anchors": len(anchors), "anchor_kl_last": round(sum(anchor_kls[-10:]) / len(anchor_kls[-10:]), 5)
        if anchor_kls else None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
    }
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=settings.adapters_dir))
    try:
        model.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(ckpt, ignore_errors=True)
    return TrainResult(path=tmp, metrics=metrics, config=config)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    tmp = path / "train_meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False, default=str))
    os.replace(tmp, path / "train_meta.json")
