"""Prompt + completion → token ids, and the log-likelihood of completions: shared by training and the gate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dialogue.model.files import resolve_model_dir
from dialogue.prompt import Message
from dialogue.settings import Settings


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + completion; the last `n_completion` ids are the ones scored."""

    ids: list[int]
    n_completion: int


def encode(tokenizer, messages: list[Message], completion: str, *, max_len: int, end: bool = True) -> Encoded:
    """The chat template's prompt, then the reply and (with `end`) its end-of-turn marker.

    The prompt keeps its most recent `max_len - completion` tokens when too long; the reply keeps at
    most half of `max_len`, so a long reply never squeezes its own question out.
    """
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                              tokenize=False)
    if not full_text.startswith(prompt_text):  # a template that rewrites earlier turns: fall back to plain append
        full_text = prompt_text + completion + (tokenizer.eos_token or "")
    rest = full_text[len(prompt_text):]
    if not end:
        rest = completion
    else:  # score up to and including the end-of-turn token, not the newline some templates add after it
        eos = tokenizer.eos_token or ""
        cut = rest.find(eos, len(completion)) if eos else -1
        rest = rest[: cut + len(eos)] if cut >= 0 else rest.rstrip("\n")
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    completion_ids = tokenizer.encode(rest, add_special_tokens=False)[: max(max_len // 2, 1)]
    prompt_ids = prompt_ids[-(max_len - len(completion_ids)):]
    return Encoded(prompt_ids + completion_ids, len(completion_ids))


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) left-padded, so every completion ends at the right edge
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    n_completion: torch.Tensor  # (B,)
    keep: int  # logits needed: the longest completion + 1


def collate(items: list[Encoded], pad_id: int) -> Batch:
    length = max(len(item.ids) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, length - len(item.ids):] = torch.tensor(item.ids)
        mask[row, length - len(item.ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    n_completion = torch.tensor([item.n_completion for item in items])
    return Batch(ids, mask, positions, n_completion, int(n_completion.max()) + 1)


def next_token_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every next token over the last K-1 positions (B, K-1, V), which of them predict a completion
    token (B, K-1)); differentiable."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=batch.keep, use_cache=False)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # predictions for the last K-1 positions
    offsets = torch.arange(batch.keep - 1).unsqueeze(0)  # position within the kept window
    return logp, offsets >= (batch.keep - 1 - batch.n_completion).unsqueeze(1)


def completion_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each completion's tokens (B,), token counts (B,)); differentiable."""
    logp, scored = next_token_logprobs(model, batch)
    targets = batch.input_ids[:, -(batch.keep - 1):]  # (B, K-1)
    logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, K-1)
    return (logp * scored).sum(-1), scored.sum(-1)


def greedy_replies(model, tokenizer, conversations: list[list[Message]], *, max_new_tokens: int,
                   repetition_penalty: float, batch_size: int) -> list[tuple[str, bool]]:
    """(reply, whether it ended before `max_new_tokens`) of the model as it is set now, greedy, left-padded."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    replies: list[tuple[str, bool]] = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     repetition_penalty=repetition_penalty,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            ended = (new == tokenizer.eos_token_id).any(-1).tolist()
            texts_out = tokenizer.batch_decode(new, skip_special_tokens=True)
            replies += [(text.strip(), done) for text, done in zip(texts_out, ended)]
    finally:
        tokenizer.padding_side = side
    return replies


def base_model_dir(settings: Settings) -> Path:
    return resolve_model_dir(settings.model, settings.models_dir)


def training_dtype(settings: Settings) -> torch.dtype:
    """bf16 only where the CPU has it natively: elsewhere (AVX2 only) it is emulated and 4-5x slower than fp32."""
    from dialogue.model.worker import choose_dtype

    return choose_dtype(settings.dtype)


def load_base(settings: Settings):
    """(model, tokenizer) of the base model, in eval mode, with every weight frozen."""
    from dialogue.model.worker import load_model

    model, tokenizer = load_model(base_model_dir(settings), training_dtype(settings))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def set_threads(settings: Settings) -> None:
    import os

    torch.set_num_threads(settings.threads or min(2, os.cpu_count() or 1))
