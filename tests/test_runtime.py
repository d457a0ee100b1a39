"""The model worker on a tiny random Llama: sampling, streaming, concurrency, cancellation, adapters."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dialogue.model.worker import AdapterRef, GenerationParams, ModelWorker, load_model, sample_next

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)


@pytest.fixture
def worker(tiny_model_dir):
    worker = ModelWorker(lambda: load_model(tiny_model_dir, torch.float32), threads=1)
    worker.wait_ready(60)
    yield worker
    worker.close()


def prompt(worker, text="Hello! How can I help you today?") -> list[int]:
    return worker.tokenizer.encode(text, add_special_tokens=False)


def test_greedy_sampling_takes_the_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    rng = torch.Generator().manual_seed(0)
    assert sample_next(logits, [], GenerationParams(temperature=0.0, repetition_penalty=1.0), rng) == 1


def test_repetition_penalty_applies_to_the_reply_only():
    logits = torch.tensor([0.0, 3.0, 2.9, 0.0])
    rng = torch.Generator().manual_seed(0)
    params = GenerationParams(temperature=0.0, repetition_penalty=1.5)
    assert sample_next(logits, [], params, rng) == 1
    assert sample_next(logits, [1], params, rng) == 2  # 3.0 / 1.5 < 2.9


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.tensor([10.0, 9.0, -5.0, -5.0, -5.0])
    params = GenerationParams(temperature=1.0, top_p=0.5, repetition_penalty=1.0)
    rng = torch.Generator().manual_seed(0)
    assert {sample_next(logits, [], params, rng) for _ in range(50)} == {0}


def test_top_p_beyond_the_shortlist_sorts_the_whole_vocabulary():
    from dialogue.model.worker import SHORTLIST

    logits = -torch.arange(1000, dtype=torch.float32) / 500  # a gentle slope: the nucleus is hundreds wide
    params = GenerationParams(temperature=1.0, top_p=0.9, repetition_penalty=1.0)
    probs = torch.softmax(logits, dim=-1)
    nucleus = int(((torch.cumsum(probs, 0) - probs) < 0.9).sum())
    assert nucleus > SHORTLIST
    rng = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, [], params, rng) for _ in range(300)}
    assert max(drawn) >= SHORTLIST and max(drawn) < nucleus


def test_a_batch_of_rows_samples_as_each_row_alone():
    from dialogue.model.worker import sample_tokens

    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    params = [GenerationParams(temperature=0.0), GenerationParams(temperature=0.3, top_p=0.9),
              GenerationParams(temperature=1.0, top_p=1.0), GenerationParams(temperature=0.7, top_p=0.5,
                                                                               repetition_penalty=1.3),
              GenerationParams(temperature=0.0, repetition_penalty=2.0)]
    histories = [[1, 2], [], [5], [int(logits[3].argmax())], [int(logits[4].argmax())]]
    for seed in range(5):
        batched = sample_tokens(logits, histories, params, [torch.Generator().manual_seed(seed) for _ in params])
        alone = [sample_next(logits[row], histories[row], params[row], torch.Generator().manual_seed(seed))
                 for row in range(len(params))]
        assert batched == alone
    assert batched[0] == int(logits[0].argmax())


def test_streamed_text_is_the_decoded_reply_and_never_half_a_character(tiny_model_dir):
    from transformers import AutoTokenizer

    from dialogue.model.worker import Generation, ModelWorker

    worker = ModelWorker(lambda: None, eager=False)
    worker.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # byte-level: 🚲 and 日 span several tokens
    reply = "Ça va? Your 🚲 is at 日本 street, don't worry . ok"
    ids = worker.tokenizer.encode(reply, add_special_tokens=False)
    generation = Generation([1], GenerationParams(), None)
    deltas: list[str] = []
    generation._emit = deltas.append
    for n, token in enumerate(ids, start=1):
        generation.generated.append(token)
        worker._flush_text(generation, final=n == len(ids))
    assert "".join(deltas) == worker.tokenizer.decode(ids) == reply
    assert len(deltas) > 10 and not any("\ufffd" in d for d in deltas)


async def test_worker_greedy_matches_transformers_generate(worker, tiny_model_dir):
    """The hand-written KV-cache decode loop produces exactly what `generate` does."""
    ids = prompt(worker)
    generation = await worker.submit(ids, GREEDY)
    await generation.text()
    model, _ = load_model(tiny_model_dir, torch.float32)
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert generation.generated == expected[0, len(ids):].tolist()
    assert generation.finish_reason == "length" and generation.completion_tokens == 12


async def test_stream_concatenates_to_the_decoded_reply(worker):
    generation = await worker.submit(prompt(worker), GREEDY)
    chunks = [chunk async for chunk in generation]
    assert len(chunks) > 1
    assert "".join(chunks) == worker.tokenizer.decode(generation.generated, skip_special_tokens=True)


async def test_two_requests_at_once_each_get_their_own_reply(worker):
    async def one(text):
        generation = await worker.submit(prompt(worker, text), GREEDY)
        await generation.text()
        return generation.generated

    alone_a, alone_b = await one("What is my name?"), await one("The shop opens at nine.")
    together_a, together_b = await asyncio.gather(one("What is my name?"), one("The shop opens at nine."))
    assert (together_a, together_b) == (alone_a, alone_b)


async def test_a_consumer_that_stops_frees_its_slot(worker):
    params = GenerationParams(max_new_tokens=2000, temperature=0.0, ignore_eos=True)
    generation = await worker.submit(prompt(worker), params)
    async for _ in generation:
        break
    for _ in range(100):
        if worker.queue_depth == 0:
            break
        await asyncio.sleep(0.02)
    assert worker.queue_depth == 0
    assert generation.finish_reason == "cancelled"


async def test_stops_at_end_of_sequence(tiny_model_dir):
    def load_eos_loving_model():
        model, tokenizer = load_model(tiny_model_dir, torch.float32)
        with torch.no_grad():  # steer the tiny model to EOS by making the lm_head favour it overwhelmingly
            weight = model.get_output_embeddings().weight
            weight[tokenizer.eos_token_id] = 0
            weight[tokenizer.eos_token_id, 0] = 50.0
            model.model.norm.weight.fill_(1.0)
        return model, tokenizer

    worker = ModelWorker(load_eos_loving_model, threads=1)
    try:
        worker.wait_ready(60)
        generation = await worker.submit(prompt(worker), GenerationParams(max_new_tokens=50, temperature=0.0))
        assert await generation.text() == ""
        assert generation.finish_reason == "stop"
    finally:
        worker.close()


async def test_adapter_is_chosen_per_request(worker, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(tiny_model_dir, torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "v0001")
    adapter = AdapterRef("v0001", tmp_path / "v0001")

    async def run(adapter_ref):
        generation = await worker.submit(prompt(worker), GREEDY, adapter_ref)
        await generation.text()
        return generation.generated

    plain = await run(None)
    tuned = await run(adapter)
    assert tuned != plain
    assert await run(None) == plain  # base rows never see the adapter's weights
    assert await run(adapter) == tuned
