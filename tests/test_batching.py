"""Continuous batching on a tiny random Llama: batched output equals unbatched output token for token,
prompt chunks interleave with streams, the prefix cache reuses earlier turns, and adapters share a batch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dialogue.model.engines import FastEngine, TransformersEngine, open_engine
from dialogue.model.worker import AdapterRef, GenerationParams, ModelWorker, load_model

GREEDY = GenerationParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
TEXTS = ["Hello! How can I help you today?", "My name is Lena and I live in Porto. " * 6, "What is my name?",
         "The shop opens at nine and closes at six. " * 12, "Thank you, goodbye!", "Can you help me plan a trip?"]


def make_worker(tiny_model_dir, **kwargs) -> ModelWorker:
    worker = ModelWorker(lambda: load_model(tiny_model_dir, torch.float32), threads=1, **kwargs)
    worker.wait_ready(60)
    return worker


@pytest.fixture
def worker(tiny_model_dir):
    worker = make_worker(tiny_model_dir, chunk_tokens=16, prefix_cache_tokens=0)
    yield worker
    worker.close()


def ids(worker, text: str) -> list[int]:
    return worker.tokenizer.encode(text, add_special_tokens=False)


async def run(worker, text_or_ids, params=GREEDY, adapter=None):
    prompt = text_or_ids if isinstance(text_or_ids, list) else ids(worker, text_or_ids)
    generation = await worker.submit(prompt, params, adapter)
    await generation.text()
    return generation


def save_random_lora(tiny_model_dir, path, seed: int, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(tiny_model_dir, torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora.save_pretrained(path)
    return lora


def test_the_fast_engine_serves_llama_and_the_fallback_everything_else(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, torch.float32)
    assert isinstance(open_engine(model), FastEngine)
    model.config.model_type = "mistral"
    assert isinstance(open_engine(model), TransformersEngine)


async def assert_batched_equals_alone(worker, texts=TEXTS) -> None:
    alone = [(await run(worker, text)).generated for text in texts]
    together = await asyncio.gather(*(run(worker, text) for text in texts))
    assert [g.generated for g in together] == alone
    assert worker.queue_depth == 0


async def test_batched_greedy_equals_unbatched_token_for_token(worker):
    await assert_batched_equals_alone(worker)


async def test_requests_joining_mid_stream_do_not_change_anyones_output(worker):
    long = GenerationParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    alone = [(await run(worker, text, long)).generated for text in TEXTS]

    async def late(i, text):
        await asyncio.sleep(0.01 * i)
        return await run(worker, text, long)

    together = await asyncio.gather(*(late(i, text) for i, text in enumerate(TEXTS)))
    assert [g.generated for g in together] == alone


async def test_fast_engine_matches_the_transformers_forward(tiny_model_dir):
    fast = make_worker(tiny_model_dir, prefix_cache_tokens=0)
    # the same token ids need the same keys and values: transformers keeps them in float32 (the fast engine's
    # default beside float32 is bfloat16, whose rounding flips the near-ties of a random tiny model's argmax)
    fast.engine = FastEngine(load_model(tiny_model_dir, torch.float32)[0], kv_dtype=torch.float32)
    slow = make_worker(tiny_model_dir)
    slow.engine = TransformersEngine(load_model(tiny_model_dir, torch.float32)[0])
    try:
        for text in TEXTS[:3]:
            assert (await run(fast, text)).generated == (await run(slow, text)).generated
        together = await asyncio.gather(*(run(slow, text) for text in TEXTS[:3]))
        assert [g.generated for g in together] == [(await run(fast, t)).generated for t in TEXTS[:3]]
    finally:
        fast.close()
        slow.close()


async def test_the_fallback_serves_adapters_per_row_like_the_fast_engine(tiny_model_dir, tmp_path):
    save_random_lora(tiny_model_dir, tmp_path / "a", seed=1)
    adapter = AdapterRef("a-1", tmp_path / "a")
    fast = make_worker(tiny_model_dir, prefix_cache_tokens=0)
    # the same token ids need the same keys and values: transformers keeps them in float32 (the fast engine's
    # default beside float32 is bfloat16, whose rounding flips the near-ties of a random tiny model's argmax)
    fast.engine = FastEngine(load_model(tiny_model_dir, torch.float32)[0], kv_dtype=torch.float32)
    slow = make_worker(tiny_model_dir)
    slow.engine = TransformersEngine(load_model(tiny_model_dir, torch.float32)[0])
    try:
        plan = [(TEXTS[0], adapter), (TEXTS[2], None), (TEXTS[4], adapter)]
        together = await asyncio.gather(*(run(slow, text, adapter=ref) for text, ref in plan))
        assert [g.generated for g in together] == [(await run(fast, text, adapter=ref)).generated for text, ref in plan]
    finally:
        fast.close()
        slow.close()


async def test_a_long_prompt_is_read_in_chunks_while_other_streams_go_on(worker):
    params = GenerationParams(max_new_tokens=30, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    streaming = await worker.submit(ids(worker, TEXTS[0]), params)
    stream = streaming.__aiter__()
    assert await stream.__anext__()
    long_prompt = ids(worker, TEXTS[3] * 3)
    assert len(long_prompt) > 4 * worker.chunk_tokens
    late = await worker.submit(long_prompt, GREEDY)
    late_first: list[int] = []

    async def read_late():
        async for _ in late:
            late_first.append(len(streaming.generated))

    async def read_stream():
        async for _ in stream:
            pass

    await asyncio.gather(read_stream(), read_late())
    assert streaming.finish_reason == late.finish_reason == "length"
    # The stream kept going while the long prompt was read: it had more tokens before the prompt's first one.
    assert late_first[0] > 3
    assert late.generated == (await run(worker, long_prompt)).generated


async def test_the_next_turn_prefills_only_what_is_new(tiny_model_dir):
    cached = make_worker(tiny_model_dir, prefix_cache_tokens=4096)
    plain = make_worker(tiny_model_dir, prefix_cache_tokens=0)
    try:
        first = await run(cached, TEXTS[3])
        assert first.reused_tokens == 0
        next_turn = ids(cached, TEXTS[3]) + first.generated + ids(cached, " What time is it now?")
        second = await run(cached, next_turn)
        assert second.reused_tokens == len(ids(cached, TEXTS[3])) + len(first.generated) - 1
        assert second.generated == (await run(plain, next_turn)).generated
        other = await run(cached, ids(cached, TEXTS[1]))  # nothing shared: nothing reused
        assert other.reused_tokens == 0
    finally:
        cached.close()
        plain.close()


async def test_the_prefix_cache_is_bounded_and_keyed_by_adapter(tiny_model_dir, tmp_path):
    save_random_lora(tiny_model_dir, tmp_path / "a", seed=1)
    worker = make_worker(tiny_model_dir, prefix_cache_tokens=200)
    try:
        for text in TEXTS:
            await run(worker, text)
            assert worker.prefix_cache.tokens <= 200
        base_turn = await run(worker, TEXTS[3])
        assert base_turn.reused_tokens > 0
        tuned = await run(worker, TEXTS[3], adapter=AdapterRef("a", tmp_path / "a"))
        assert tuned.reused_tokens == 0  # another adapter's keys and values are never reused
    finally:
        worker.close()


async def test_adapters_share_a_batch_and_never_see_each_others_weights(worker, tiny_model_dir, tmp_path):
    lora_a = save_random_lora(tiny_model_dir, tmp_path / "a", seed=1)
    save_random_lora(tiny_model_dir, tmp_path / "b", seed=2, targets=("k_proj", "up_proj", "down_proj"))
    a, b = AdapterRef("a-1", tmp_path / "a"), AdapterRef("b-1", tmp_path / "b")
    plan = [(TEXTS[0], a), (TEXTS[1], b), (TEXTS[2], None), (TEXTS[0], b), (TEXTS[4], a), (TEXTS[0], None)]
    alone = [(await run(worker, text, adapter=ref)).generated for text, ref in plan]
    assert len({tuple(alone[0]), tuple(alone[3]), tuple(alone[5])}) == 3  # the adapters really change the output
    together = await asyncio.gather(*(run(worker, text, adapter=ref) for text, ref in plan))
    assert [g.generated for g in together] == alone
    # The fast engine's LoRA maths is peft's: same greedy tokens as the peft model's own generate.
    prompt = ids(worker, TEXTS[0])
    lora_a.eval()
    expected = lora_a.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert alone[0] == expected[0, len(prompt):].tolist()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
async def test_quantised_decode_is_deterministic_across_batch_shapes(tiny_model_dir, quantize):
    from dialogue.model.fastllama import DecodePlan

    worker = make_worker(tiny_model_dir, decode=DecodePlan.fixed(quantize, 6), chunk_tokens=16, prefix_cache_tokens=0)
    try:  # six rows: every decode step stays on the quantised weights, batched or not
        await assert_batched_equals_alone(worker)
    finally:
        worker.close()


async def test_more_requests_than_slots_wait_their_turn(tiny_model_dir):
    worker = make_worker(tiny_model_dir, max_batch=2, prefix_cache_tokens=0)
    try:
        await assert_batched_equals_alone(worker)
    finally:
        worker.close()


async def test_a_cancelled_request_frees_its_slot_at_once(worker):
    params = GenerationParams(max_new_tokens=2000, temperature=0.0, ignore_eos=True)
    keep = await worker.submit(ids(worker, TEXTS[2]), GREEDY)
    drop = await worker.submit(ids(worker, TEXTS[0]), params)
    drop.cancel()
    await keep.text()
    for _ in range(100):
        if worker.queue_depth == 0:
            break
        await asyncio.sleep(0.01)
    assert worker.queue_depth == 0 and drop.finish_reason == "cancelled"
    assert keep.generated == (await run(worker, TEXTS[2])).generated


async def test_a_prompt_longer_than_the_model_is_refused_plainly(worker):
    from dialogue.errors import GenerationError

    with pytest.raises(GenerationError, match="exceeds"):
        await worker.submit([5] * 3000, GREEDY)


def test_int4_reproduces_weights_already_on_a_4_bit_grid():
    """GGUF Q4_1 blocks (w = q·d + m, 32 along the input, q spanning 0..15) survive int4 exactly; int8 does not."""
    from dialogue.model.fastllama import Linear

    def error(fmt):
        linear = Linear(w)
        linear.quantize(fmt, 8)
        return ((linear(x) - exact).abs().max() / exact.abs().max()).item()

    torch.manual_seed(0)
    q = torch.randint(0, 16, (64, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15
    d, m = (torch.rand(64, 4, 1) * 0.01 + 0.001).half().float(), (torch.rand(64, 4, 1) * 0.05).half().float()
    w = (q * d - m).reshape(64, 128)  # GGUF keeps d and m in float16, as int4 does
    x = torch.randn(3, 128)
    exact = x @ w.T
    assert error("int4") < 1e-5 < error("int8") < 2e-2
    assert error("torch-int4") < 1e-5
