"""``moemesh generate``: one prompt through the engine, streamed to stdout or as one JSON object."""
from __future__ import annotations

import argparse
import json
import sys
import time

from ..engine.engine import Engine
from ..engine.sampling_params import SamplingParams
from ..errors import MoemeshError
from ..kvcache.spec import KV_HELP, parse_kv_spec
from ..loading.loader import load_model
from ..models.build import QUANT_MODES
from ..sysinfo import peak_rss_bytes
from ..tokenizer.detok import IncrementalDetokenizer
from .cache_args import add_cache_args, build_prefix_cache, requested_prefix_bytes
from .expert_args import add_expert_args, expert_options

QUANT_CHOICES = ("none",) + QUANT_MODES  # none = fp32 everywhere


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("model", help="checkpoint directory, .gguf file, or 'smollm2'")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image for a vision-language model (Qwen3.5-MoE); repeat for several, in prompt order")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto",
                   help="weights at run time: auto keeps them as stored (GGUF 4-bit stays 4-bit)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--kv", default="dense", help=KV_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--compile", action="store_true",
                   help="decode a single sequence with one torch.compile graph (cold compile ~1-3 min, cached on disk)")
    add_expert_args(p)
    add_cache_args(p, default="off")  # one prompt: worth it only with --prompt-cache
    p.set_defaults(func=run)


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MoemeshError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def with_images(loaded, prompt_ids: list[int], files: list[str]):
    """The prompt with its images' tokens and their Media. A prompt without image placeholders (plain
    text, --prompt-ids) gets one per image in front, as a chat template would write them."""
    from ..tokenizer.images import open_image

    if loaded.images is None:
        raise MoemeshError(f"{loaded.path}: this model does not take images (no vision tower)")
    images = [open_image(f) for f in files]
    if loaded.images.tokens.image not in prompt_ids:
        prompt_ids = loaded.images.placeholder() * len(images) + prompt_ids
    return loaded.images.prepare(prompt_ids, images)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        kv = parse_kv_spec(args.kv)
    except ValueError as e:
        raise MoemeshError(f"--kv: {e}") from None
    if args.prompt_cache and args.prefix_cache == "off":
        args.prefix_cache = "auto"
    experts = expert_options(args)
    experts.prefix_cache = requested_prefix_bytes(args)
    quant = "fp32" if args.quant == "none" else args.quant
    t_load = time.perf_counter()
    loaded = load_model(args.model, quant, experts=experts)
    load_seconds = time.perf_counter() - t_load
    tok = loaded.tokenizer
    if args.prompt_ids is not None:
        prompt_ids = parse_ids(args.prompt_ids)
        vocab = loaded.args.vocab_size
        bad = [i for i in prompt_ids if not 0 <= i < vocab]
        if bad:
            raise MoemeshError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    else:
        if tok is None:
            raise MoemeshError(f"{loaded.path}: no tokenizer found; use --prompt-ids")
        text = args.prompt
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            content = [{"type": "image"}] * len(args.image) + [{"type": "text", "text": text}] if args.image else text
            text = tok.apply_chat_template(messages + [{"role": "user", "content": content}], add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=not args.chat)
    media = None
    if args.image:
        prompt_ids, media = with_images(loaded, prompt_ids, args.image)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
    )
    stops = tok.eos_token_ids if tok is not None else frozenset(loaded.args.eos_token_ids)
    if tok is not None:
        from ..tokenizer.formats import harmony

        if harmony.is_harmony(tok):  # gpt-oss: <|end|> closes the analysis, not the turn
            stops = harmony.stop_token_ids(tok)
    cache = loaded.model.new_cache(str(kv))
    prefix = build_prefix_cache(args, loaded, cache, quant, str(kv))
    engine = Engine(loaded.model, stop_token_ids=frozenset(stops), cache=cache, compiled=args.compile,
                    prefix_cache=prefix)
    detok = IncrementalDetokenizer(tok, prompt_ids) if tok is not None else None

    def stream(out) -> None:
        if detok is not None and not args.json and out.new_token not in stops:
            sys.stdout.write(detok.add(out.new_token))
            sys.stdout.flush()

    (seq,) = engine.generate([prompt_ids], params, on_token=stream, media=[media])
    if args.json:
        gen = seq.output_ids
        n_decode = max(0, len(gen) - 1)  # the first token comes out of the prefill step
        result = {
            "text": tok.decode([t for t in gen if t not in stops]) if tok is not None else None,
            "token_ids": gen,
            "prompt_tokens": len(prompt_ids),
            "cached_tokens": seq.cached_tokens,  # restored from the prefix cache (--prompt-cache)
            "completion_tokens": len(gen),
            "finish_reason": seq.finish_reason,
            "prefill_tok_s": len(prompt_ids) / seq.prefill_seconds if seq.prefill_seconds else None,
            "decode_tok_s": n_decode / seq.decode_seconds if seq.decode_seconds else None,
            "load_seconds": load_seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "quant": args.quant,
            "kv": str(kv),
            "kv_bytes_per_token": cache.bytes_per_token(),
            "prefix_cache": prefix.summary() if prefix is not None else None,
            "model": str(loaded.path),
        }
        if loaded.provider is not None:
            result["experts"] = loaded.provider.stats()
            if loaded.budget is not None:
                result["experts"]["budget"] = vars(loaded.budget)
        print(json.dumps(result))
    else:
        if detok is not None:
            sys.stdout.write(detok.flush())
        sys.stdout.write("\n")
    if prefix is not None and prefix.store is not None:
        prefix.store.flush()  # the files must be written before the process exits
    return 0
