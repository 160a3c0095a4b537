"""Structured output in the engine: grammar masks per sequence, on a tiny random checkpoint with
SmolLM2's vocabulary and on SmolLM2 itself; every answer parses and validates (jsonschema), at
temperature 0 and 1, batched with unconstrained sequences. Also the mask against its reference,
unsupported schema features named, and each tool-call format's grammar."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from moemesh.engine.constraints import apply_bitmasks, apply_bitmasks_reference, bitmask_words
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.loader import load_model
from moemesh.loading.source import resolve_model_path
from moemesh.tokenizer.formats import deepseek_tools, harmony, tool_formats
from moemesh.tokenizer.formats.chat_prompt import ToolMode
from moemesh.tokenizer.formats.tool_grammar import forced_call_grammar, response_grammar
from moemesh.tokenizer.grammar import GrammarCompiler, GrammarError
from moemesh.tokenizer.tokenizer import Tokenizer

SCHEMAS = {k: v for k, v in json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text()).items()
           if not k.startswith("_")}


@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    return Tokenizer.from_gguf(resolve_model_path("smollm2"))


@pytest.fixture(scope="module")
def compiler(smol_tok) -> GrammarCompiler:
    return GrammarCompiler(smol_tok, frozenset(smol_tok.eos_token_ids))


def test_schema_examples_are_valid():
    for name, case in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(case["schema"])
        jsonschema.validate(case["example"], case["schema"]), name


def test_apply_bitmasks_matches_reference():
    g = torch.Generator().manual_seed(0)
    vocab = 101  # not a multiple of 32: the last word's high bits and a short bitmask
    logits = torch.randn(3, vocab + 40, generator=g)  # [B, V]: logits wider than the bitmask (128 bits)
    masks = [torch.randint(-2**31, 2**31 - 1, (bitmask_words(vocab),), dtype=torch.int32, generator=g), None,
             torch.zeros(bitmask_words(vocab), dtype=torch.int32)]
    masks[2][0] = 1 << 5
    fast, ref = logits.clone(), logits.clone()
    apply_bitmasks(fast, masks)
    apply_bitmasks_reference(ref, masks)
    assert torch.equal(fast, ref)
    assert torch.equal(fast[1], logits[1])  # a row without a grammar is untouched
    assert torch.isfinite(fast[2]).sum() == 1 and torch.isfinite(fast[2, 5])
    assert torch.isinf(fast[0, 32 * bitmask_words(vocab):]).all()  # past the bitmask: never allowed


def test_example_walks_accept_and_bad_text_is_refused(smol_tok, compiler):
    for name, case in SCHEMAS.items():
        grammar = response_grammar(smol_tok, case["schema"], name)
        compiler.check(grammar)
        m = compiler.matcher(grammar)
        assert all(m.advance(t) for t in smol_tok.encode(json.dumps(case["example"]))), (name, m.error)
        assert m.done
    m = compiler.matcher(response_grammar(smol_tok, SCHEMAS["order"]["schema"], "order"))
    ids = smol_tok.encode('{"order_id": 12, ')  # below the minimum
    assert not all(m.advance(t) for t in ids)


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"if": {"type": "integer"}, "then": {"minimum": 0}}, "if"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
])
def test_unsupported_schema_features_are_named(smol_tok, compiler, schema, named):
    with pytest.raises(GrammarError) as err:
        compiler.check(response_grammar(smol_tok, schema, "response_format.json_schema.schema"), "response_format")
    assert named in str(err.value) and "response_format.json_schema.schema" in str(err.value)


def _tool(name: str, params: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": params}}


WEATHER = _tool("get_weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                "required": ["city", "days"], "additionalProperties": False})
ADD = _tool("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"], "additionalProperties": False})
TOOLS = (WEATHER, ADD)


def _with_format(smol_tok: Tokenizer, template: str, specials: list[str]) -> Tokenizer:
    """SmolLM2's vocabulary plus a format's special tokens, under a template that names the format."""
    backend = Backend.from_str(smol_tok.backend.to_str())  # a copy
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=list(smol_tok.eos_token_ids), chat_template=template)


def _formats(smol_tok: Tokenizer) -> dict[str, tuple[Tokenizer, str, str]]:
    """format -> (tokenizer, what follows the named prefill, what follows the required prefill)"""
    args = '{"city": "Oslo", "days": 3}'
    ds = deepseek_tools
    kimi = [tool_formats.KIMI_OPEN, tool_formats.KIMI_CALL, tool_formats.KIMI_ARGS, tool_formats.KIMI_END,
            tool_formats.KIMI_CLOSE]
    return {
        "hermes": (smol_tok, args + "}\n</tool_call>", 'get_weather", "arguments": ' + args + "}\n</tool_call>"),
        "harmony": (_with_format(smol_tok, "{{ '<|channel|>' }}", [harmony.CHANNEL, harmony.MESSAGE, harmony.CONSTRAIN,
                                                                     harmony.CALL, harmony.RETURN]),
                    args + harmony.CALL, "get_weather " + harmony.CONSTRAIN + "json" + harmony.MESSAGE + args + harmony.CALL),
        "deepseek": (_with_format(smol_tok, ds.CALLS_BEGIN, [ds.CALLS_BEGIN, ds.CALL_BEGIN, ds.SEP, ds.CALL_END, ds.CALLS_END]),
                     args + "\n```" + ds.CALL_END + ds.CALLS_END,
                     "get_weather\n```json\n" + args + "\n```" + ds.CALL_END + ds.CALLS_END),
        "kimi": (_with_format(smol_tok, "".join(kimi), kimi),
                 "0" + tool_formats.KIMI_ARGS + args + tool_formats.KIMI_END + tool_formats.KIMI_CLOSE,
                 "get_weather:0" + tool_formats.KIMI_ARGS + args + tool_formats.KIMI_END + tool_formats.KIMI_CLOSE),
    }


@pytest.mark.parametrize("fmt", ["hermes", "harmony", "deepseek", "kimi"])
def test_forced_call_grammar_per_format(smol_tok, fmt):
    tok, named_text, required_text = _formats(smol_tok)[fmt]
    compiler = GrammarCompiler(tok, frozenset(tok.eos_token_ids))
    for mode, text in ((ToolMode("named", frozenset({"get_weather", "add"}), "get_weather", TOOLS), named_text),
                       (ToolMode("required", frozenset({"get_weather", "add"}), None, TOOLS), required_text)):
        grammar = forced_call_grammar(tok, mode)
        compiler.check(grammar)
        m = compiler.matcher(grammar)
        ids = tok.encode(text)
        assert all(m.advance(t) for t in ids), (fmt, mode.kind, m.error)
        assert m.done, (fmt, mode.kind)
        bad = compiler.matcher(grammar)  # arguments breaking the tool's schema (days out of range)
        assert not all(bad.advance(t) for t in tok.encode(text.replace('"days": 3', '"days": 9'))), (fmt, mode.kind)


def _run(loaded, compiler, temps: tuple[float, ...], max_tokens: int, with_free: bool = True):
    """Every schema at every temperature, plus an unconstrained neighbour, in one batch."""
    tok = loaded.tokenizer
    engine = Engine(loaded.model, stop_token_ids=frozenset(tok.eos_token_ids), max_batch=64)
    jobs = []
    for name, case in SCHEMAS.items():
        msg = [{"role": "user", "content": f"Give me a {name} as JSON: {json.dumps(case['schema'])}"}]
        ids = tok.encode(tok.apply_chat_template(msg, add_generation_prompt=True))
        for i, temp in enumerate(temps):
            grammar = response_grammar(tok, case["schema"], name)
            compiler.check(grammar)
            seq = engine.add_request(ids, SamplingParams(temperature=temp, max_tokens=max_tokens, seed=100 + i),
                                     grammar=compiler.matcher(grammar))
            jobs.append((name, temp, seq))
    free_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a story."}],
                                                  add_generation_prompt=True))
    free = engine.add_request(free_ids, SamplingParams(temperature=0, max_tokens=12)) if with_free else None
    while engine.has_work():
        engine.step()
    for name, temp, seq in jobs:
        text = tok.decode(seq.output_ids, skip_special_tokens=True)
        assert seq.finish_reason == "stop", (name, temp, seq.finish_reason, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name]["schema"])
    if free is not None:  # the unconstrained sequence is the same as alone
        alone = Engine(loaded.model, stop_token_ids=frozenset(tok.eos_token_ids))
        ref = alone.generate([free_ids], SamplingParams(temperature=0, max_tokens=12))[0]
        assert free.output_ids == ref.output_ids


@pytest.fixture(scope="module")
def tiny_smol_vocab(tmp_path_factory, smol_tok):
    """A tiny random llama with SmolLM2's 49,152-token vocabulary and its tokenizer + chat template."""
    from transformers import LlamaConfig

    from tiny import make_checkpoint

    d = tmp_path_factory.mktemp("tiny-smolvocab")
    make_checkpoint(LlamaConfig(vocab_size=smol_tok.vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=1024, tie_word_embeddings=True), d)
    smol_tok.save_dir(d)
    return load_model(str(d))


def test_tiny_random_checkpoint_follows_every_schema(tiny_smol_vocab):
    tok = tiny_smol_vocab.tokenizer
    compiler = GrammarCompiler(tok, frozenset(tok.eos_token_ids))
    _run(tiny_smol_vocab, compiler, temps=(0.0, 1.0, 1.0), max_tokens=400)


@pytest.mark.slow  # 16 sequences of up to 300 tokens on SmolLM2 (tests/test_server_structured.py covers 4 schemas fast)
def test_smollm2_follows_every_schema(compiler):
    _run(load_model("smollm2"), compiler, temps=(0.0, 1.0), max_tokens=300, with_free=False)


def test_masked_greedy_fast_path_equals_general_path():
    from moemesh.engine.sampler import Sampler

    g = torch.Generator().manual_seed(1)
    vocab = 300
    logits = torch.randn(3, vocab, generator=g) * 4  # [B, V]
    masks = [torch.randint(-2**31, 2**31 - 1, (bitmask_words(vocab),), dtype=torch.int32, generator=g), None,
             torch.randint(-2**31, 2**31 - 1, (bitmask_words(vocab),), dtype=torch.int32, generator=g)]
    fast = Sampler().sample(logits, [SamplingParams(temperature=0)] * 3, [[]] * 3, [[]] * 3, [None] * 3, masks)
    general = Sampler().sample(logits, [SamplingParams(temperature=0, logprobs=0)] * 3, [[]] * 3, [[]] * 3,
                               [None] * 3, masks)  # logprobs asked: the torch path
    assert fast.token_ids == general.token_ids
    assert torch.allclose(torch.tensor(fast.logprobs), torch.tensor(general.logprobs), atol=1e-4)
    masked = logits.clone()
    apply_bitmasks_reference(masked, masks)
    assert fast.token_ids == masked.argmax(dim=1).tolist()
