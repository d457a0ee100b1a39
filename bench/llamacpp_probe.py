"""Run by llama-cpp-python's interpreter (`make llama-server`), not ours: time llama.cpp on the same GGUF.

Reads {"gguf", "prompts": [[ids]], "new_tokens", "threads"} on stdin; prints {"ttft_s", "decode_tok_s",
"turn_s"} medians, measured exactly as bench/gen.py measures ours (first streamed token, then the rest).
"""

import json
import statistics
import sys
import time

from llama_cpp import Llama


def main() -> None:
    job = json.load(sys.stdin)
    llm = Llama(model_path=job["gguf"], n_ctx=4096, n_threads=job["threads"], n_threads_batch=job["threads"],
                n_batch=512, verbose=False)
    llm.create_completion(prompt=job["prompts"][0][:32], max_tokens=4, temperature=0.0)  # warm-up
    never = {llm.token_eos(): -1000.0}  # both sides make exactly new_tokens tokens
    rows = []
    for prompt in job["prompts"]:
        llm.reset()
        start = time.perf_counter()
        first = None
        tokens = 0
        for _ in llm.create_completion(prompt=prompt, max_tokens=job["new_tokens"], temperature=0.0,
                                        logit_bias=never, stream=True):
            tokens += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        rows.append({"ttft_s": first - start, "decode_tok_s": max(tokens - 1, 1) / max(end - first, 1e-9),
                     "turn_s": end - start, "tokens": tokens})
    print(json.dumps({key: round(statistics.median(r[key] for r in rows), 4)
                      for key in ("ttft_s", "decode_tok_s", "turn_s", "tokens")}))


if __name__ == "__main__":
    main()
