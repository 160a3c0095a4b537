"""Tiny checkpoints that write exactly what a test wants, for end-to-end tests of chat formats.

A random-weight model never writes valid Harmony or DeepSeek syntax, so the server's renderers and
parsers could not be checked through HTTP with one. Here the trunk stays random, and only the
output head is fitted (least squares): for each given (prompt, script) pair, the final hidden
state at every position of prompt + script maps to the next script token, so greedy decoding of
that prompt writes the script and ends with its last (end-of-turn) token. The hidden states come
from transformers' implementation of the architecture; the server must reproduce them (and render
the very prompt the fit saw) for the script to come out. Nothing in the server knows about this:
the prompt is rendered, tokens are generated, detokenized and parsed as for any checkpoint.

The tokenizer is a small byte-level BPE trained on the texts, with the format's special tokens.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SCALE = 20.0  # target logit of the scripted token (every other logit is fitted to 0)


@dataclass(frozen=True)
class Scripted:
    body: dict[str, Any]  # a /v1/chat/completions body (messages, tools, tool_choice)
    script: str  # what the model writes for it, its end-of-turn token included


def prompt_ids(tokenizer, body: dict[str, Any]) -> list[int]:
    """The prompt the server runs for ``body``: validated and rendered as openai_chat.py does."""
    from moemesh.server.openai.schemas import ChatCompletionRequest, NamedToolChoice
    from moemesh.tokenizer.formats.chat_prompt import build_chat_prompt

    req = ChatCompletionRequest.model_validate({"model": "m", **body})
    choice = req.tool_choice
    choice = {"name": choice.function.name} if isinstance(choice, NamedToolChoice) else choice
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    plan = build_chat_prompt(tokenizer, [m.model_dump(exclude_none=True) for m in req.messages], tools, choice,
                             req.chat_template_kwargs)
    return tokenizer.encode(plan.text)


def make_checkpoint(directory: Path, config_for: Callable[[int], Any], scripts: list[Scripted], *,
                    special: list[str], plain: list[str] = (), eos: list[str], bos: str | None = None,
                    vocab_size: int = 1000) -> float:
    """Write a checkpoint that answers each scripted body with its script (greedy); returns the
    fit's smallest logit margin. ``config_for(vocab_size)`` is the transformers config."""
    from transformers import AutoModelForCausalLM

    from moemesh.tokenizer.tokenizer import Tokenizer as MoemeshTokenizer

    # the rendered prompts depend only on the special tokens: render them with a first tokenizer,
    # then train the real one on them too, so that prompts are short (fast fit, fast prefill)
    save_tokenizer(train_tokenizer([], special, plain, vocab_size=0), directory, eos=eos, bos=bos)
    first = MoemeshTokenizer.from_dir(directory)
    texts = [s.script for s in scripts] + [first.decode(prompt_ids(first, s.body)) for s in scripts]
    tok = train_tokenizer(texts, special, plain, vocab_size=vocab_size)
    save_tokenizer(tok, directory, eos=eos, bos=bos)
    ours = MoemeshTokenizer.from_dir(directory)
    pairs = [(prompt_ids(ours, s.body), ours.encode(s.script)) for s in scripts]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(tok.get_vocab_size())).eval()
    with torch.no_grad():  # unit-scale embeddings and attention: the context moves the hidden state
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0, 1.0)
            elif name.endswith("_proj.weight") and "self_attn" in name:
                p.normal_(0, p.shape[1] ** -0.5)
    margin = fit_head(model, pairs)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    save_tokenizer(tok, directory, eos=eos, bos=bos)  # save_pretrained wrote its own generation_config
    return margin


def train_tokenizer(texts: list[str], special: list[str], plain: list[str] = (), vocab_size: int = 400) -> Tokenizer:
    """Byte-level BPE over ``texts``; ``special`` tokens are skipped when decoding with
    skip_special_tokens, ``plain`` ones (e.g. DeepSeek's tool-call tags) are kept, as in the
    published tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tok


def final_hidden(model, ids: list[int]) -> torch.Tensor:
    """[T, D] hidden states after the final norm (what the output head reads)."""
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def fit_head(model, pairs: list[tuple[list[int], list[int]]]) -> float:
    """Set ``model.lm_head`` so that greedy decoding of each prompt writes its script; returns the
    smallest margin (scripted logit minus the best other) over every fitted position."""
    rows, targets = [], []
    for prompt, script in pairs:
        ids = prompt + script[:-1]
        h = final_hidden(model, ids)[len(prompt) - 1:]  # [S, D]: the positions that predict the script
        rows.append(h)
        targets += script
    H = torch.cat(rows).double()  # [N, D]
    Y = torch.zeros(len(targets), model.config.vocab_size, dtype=torch.float64)  # [N, V]
    Y[torch.arange(len(targets)), torch.tensor(targets)] = SCALE
    assert H.shape[0] < H.shape[1], f"{H.shape[0]} scripted positions need a hidden size above that"
    W = (H.T @ torch.linalg.solve(H @ H.T, Y)).T  # [V, D]: the least-norm exact fit (rows are independent)
    with torch.no_grad():
        model.lm_head.weight.copy_(W.float())
        logits = H.float() @ model.lm_head.weight.T  # [N, V]
    want = logits[torch.arange(len(targets)), torch.tensor(targets)]
    logits[torch.arange(len(targets)), torch.tensor(targets)] = float("-inf")
    return float((want - logits.max(dim=1).values).min())


def save_tokenizer(tok: Tokenizer, directory: Path, *, eos: list[str], bos: str | None = None) -> None:
    """tokenizer.json, tokenizer_config.json (no chat template) and generation_config.json with
    the end-of-turn ids (the first of ``eos`` is the tokenizer's eos_token)."""
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": eos[0], "bos_token": bos, "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    gen = {"eos_token_id": [tok.token_to_id(t) for t in eos], "bos_token_id": tok.token_to_id(bos) if bos else None}
    (directory / "generation_config.json").write_text(json.dumps(gen))
