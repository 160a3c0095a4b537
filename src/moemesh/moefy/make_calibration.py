"""Regenerate data/calib_chats.json: SmolLM2's own answers to data/calib_prompts.txt.

    .venv/bin/python -m moemesh.moefy.make_calibration [--model smollm2]

Sampled (temperature 0.7, top-p 0.9, fixed seed per prompt) rather than greedy, so the answers
vary in wording the way chat traffic does. Run once; the file is shipped.
"""
from __future__ import annotations

import argparse
import json

from ..engine.engine import Engine
from ..engine.sampling_params import SamplingParams
from ..loading.loader import load_model
from .data import DATA, calib_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-tokens", type=int, default=160)
    a = ap.parse_args()
    loaded = load_model(a.model)
    tok = loaded.tokenizer
    prompts = calib_prompts()
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
           for p in prompts]
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=1000 + i, max_tokens=a.max_tokens)
              for i in range(len(prompts))]
    engine = Engine(loaded.model, stop_token_ids=frozenset(tok.eos_token_ids), max_batch=8)
    seqs = engine.generate(ids, params)
    chats = []
    for p, seq in zip(prompts, seqs):
        answer = tok.decode([t for t in seq.output_ids if t not in tok.eos_token_ids]).strip()
        chats.append({"prompt": p, "answer": answer})
    meta = {"how": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF) answering calib_prompts.txt; temperature 0.7, "
                   "top_p 0.9, seed 1000+i, max 160 tokens", "command": "python -m moemesh.moefy.make_calibration"}
    (DATA / "calib_chats.json").write_text(json.dumps({"meta": meta, "chats": chats}, indent=1, ensure_ascii=False))
    print(f"wrote {len(chats)} answers, {sum(len(c['answer'].split()) for c in chats)} words")


if __name__ == "__main__":
    main()
