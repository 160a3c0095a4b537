"""llama.cpp side of bench/decode.py: one fresh process per run, in the llama-cpp-python venv (no torch,
no moemesh imports). Loads the GGUF, prefills the prompt (timed, then the first token's argmax), decodes
greedily one token per ``eval`` (the first ``warmup`` steps untimed) and prints one line ``RESULT {json}``.

    ~/.cache/moemesh/peers/llamacpp-venv/bin/python bench/decode_llama.py '{"model": ..., "prompt": [...], ...}'
"""
from __future__ import annotations

import json
import sys
import time

T_START = time.perf_counter()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    threads = cfg["threads"]
    llm = Llama(model_path=cfg["model"], n_ctx=cfg["n_ctx"], n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def argmax_last() -> int:  # logits of the last evaluated token (llm.scores is only filled with logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    t0 = time.perf_counter()
    llm.eval(cfg["prompt"])
    tok = argmax_last()
    prefill_s = time.perf_counter() - t0
    first_token_s = time.perf_counter() - T_START
    tokens = [tok]
    for i in range(cfg["warmup"] + cfg["decode"]):
        if i == cfg["warmup"]:
            t0 = time.perf_counter()
        llm.eval([tok])
        tok = argmax_last()
        tokens.append(tok)
    decode_s = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "engine": "llama.cpp", "version": llama_cpp.__version__, "load_s": load_s, "prefill_s": prefill_s,
        "prefill_tok_s": len(cfg["prompt"]) / prefill_s, "decode_tok_s": cfg["decode"] / decode_s,
        "first_token_s": first_token_s, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
