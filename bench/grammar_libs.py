"""Which constrained-decoding library: llguidance vs xgrammar vs outlines-core on SmolLM2's vocabulary.

For every schema of tests/data/json_schemas.json: the time to compile it for the 49,152-token
vocabulary, then a teacher-forced walk over its example (the example's tokens, one by one, as a
decode would feed them; one untimed walk first): per token, the time to compute the allowed-token bitmask and to advance
the grammar with the token (the part a library adds to a decode step; applying the bitmask to the
logits is the same torch code for all three and is timed once, apart). Then schema coverage: a
list of JSON-Schema features, each compiled alone; "ok" = compiled, "error" = refused (with the
library's message), "ignored" = compiled but the grammar let an instance break the keyword through.

The libraries are optional here (moemesh depends only on the one it picked); a missing one is
reported as such. To compare all three:

    pip install --target /tmp/gram_eval --no-deps llguidance xgrammar outlines-core apache-tvm-ffi
    PYTHONPATH=/tmp/gram_eval .venv/bin/python bench/grammar_libs.py [--quick]

Writes bench/results/grammar_libs.{json,md} (--quick: grammar_libs_quick.*, 1 repeat).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moemesh.benchkit.results import write_results
from moemesh.engine.constraints import apply_bitmasks
from moemesh.loading.source import resolve_model_path
from moemesh.tokenizer.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"
SCHEMAS = Path(__file__).parents[1] / "tests" / "data" / "json_schemas.json"

# feature -> (schema, an instance that breaks the keyword but is otherwise valid JSON of the right shape)
FEATURES: dict[str, tuple[dict, str]] = {
    "enum": ({"enum": ["a", "b"]}, '"c"'),
    "const": ({"const": 7}, "8"),
    "integer minimum/maximum": ({"type": "integer", "minimum": 3, "maximum": 9}, "12"),
    "number minimum/maximum": ({"type": "number", "minimum": 0.5, "maximum": 2.5}, "3.5"),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 0}, "0"),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "7"),
    "string minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, '"abcd"'),
    "pattern": ({"type": "string", "pattern": "^[a-c]+$"}, '"xyz"'),
    "format date-time": ({"type": "string", "format": "date-time"}, '"yesterday"'),
    "format email": ({"type": "string", "format": "email"}, '"not-an-email"'),
    "array minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, "[1, 2, 3]"),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False}, '["x", 1]'),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}}, "[1, 2]"),
    "required + additionalProperties false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
        '{"a": 1, "b": 2}'),
    "additionalProperties schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}}, '{"x": "y"}'),
    "patternProperties": ({"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                           "additionalProperties": False}, '{"n_a": "x"}'),
    "minProperties/maxProperties": ({"type": "object", "additionalProperties": {"type": "integer"},
                                     "minProperties": 1, "maxProperties": 1}, '{"a": 1, "b": 2}'),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, '"s"'),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, '"s"'),
    "allOf": ({"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 5}]}, "9"),
    "not": ({"not": {"type": "integer"}}, "3"),
    "if/then/else": ({"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}}, "-1"),
    "$defs/$ref": ({"$defs": {"n": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/n"}},
                    "required": ["x"]}, '{"x": "s"}'),
    "recursive $ref": ({"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"],
                        "additionalProperties": False}}, "$ref": "#/$defs/node"}, '{"v": 1, "kids": [{"kids": []}]}'),
    "type list (nullable)": ({"type": ["integer", "null"]}, '"x"'),
}


class Lib:
    """One library behind three calls: compile a schema, make a matcher, step it."""

    name = ""

    def compile(self, schema: dict) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, m: Any, bitmask: torch.Tensor) -> None:  # bitmask: [1, W] int32
        raise NotImplementedError

    def advance(self, m: Any, token: int) -> bool:
        raise NotImplementedError

    def accepts_text(self, compiled: Any, text: str, tok: Tokenizer) -> bool:
        """Whether the grammar takes ``text`` (tokenized as the model would) to a final state."""
        m = self.matcher(compiled)
        return all(self.advance(m, t) for t in tok.encode(text)) and self.is_final(m)

    def is_final(self, m: Any) -> bool:
        raise NotImplementedError


class LLGuidance(Lib):
    name = "llguidance"

    def __init__(self, tok: Tokenizer) -> None:
        import llguidance
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        self.tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                                                eos_token=sorted(tok.eos_token_ids))

    def compile(self, schema: dict) -> Any:
        schema = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                           "key_separator": ": ", "lenient": False}}
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        err = self.ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if err:
            raise ValueError(err)
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tokenizer, compiled, log_level=0)

    def fill(self, m: Any, bitmask: torch.Tensor) -> None:
        self.llt.fill_next_token_bitmask(m, bitmask, 0)

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token))

    def is_final(self, m: Any) -> bool:
        return bool(m.is_accepting())


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, tok: Tokenizer) -> None:
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size,
                                                       stop_token_ids=sorted(tok.eos_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self.stop_id = min(tok.eos_token_ids)

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, bitmask: torch.Tensor) -> None:
        m.fill_next_token_bitmask(bitmask, 0)

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))

    def is_final(self, m: Any) -> bool:
        return bool(m.is_terminated() or m.accept_token(self.stop_id))  # EOS is accepted only in a final state


class OutlinesCore(Lib):
    name = "outlines-core"

    def __init__(self, tok: Tokenizer) -> None:
        import outlines_core

        self.oc = outlines_core
        eos = min(tok.eos_token_ids)
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        special = {t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special}
        mapping: dict[bytes, list[int]] = {}
        for text, i in tok.backend.get_vocab(with_added_tokens=True).items():
            if i in tok.eos_token_ids or text in special:
                continue
            mapping.setdefault(bytes(byte_of[c] for c in text), []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, mapping)

    def compile(self, schema: dict) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, m: Any, bitmask: torch.Tensor) -> None:
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)

    def advance(self, m: Any, token: int) -> bool:
        try:
            m.advance(token, return_tokens=False)
            return True
        except Exception:  # noqa: BLE001  (a token the state does not allow)
            return False

    def is_final(self, m: Any) -> bool:
        return bool(m.is_finished())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE writes tokens in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def walk(lib: Lib, compiled: Any, ids: list[int], vocab: int) -> tuple[list[float], list[float], bool]:
    """Teacher-force ``ids`` through a fresh matcher: per-token fill and advance seconds, all accepted?"""
    m = lib.matcher(compiled)
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)  # [1, W]
    fills, advances, ok = [], [], True
    for t in ids:
        t0 = time.perf_counter()
        lib.fill(m, bitmask)
        t1 = time.perf_counter()
        allowed = bool((int(bitmask[0, t // 32]) >> (t % 32)) & 1)
        t2 = time.perf_counter()
        accepted = lib.advance(m, t)
        t3 = time.perf_counter()
        fills.append(t1 - t0)
        advances.append(t3 - t2)
        if not (allowed and accepted):
            ok = False
            break
    return fills, advances, ok


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(lib: Lib, tok: Tokenizer, schemas: dict, repeats: int) -> dict:
    per_schema, fills_all, adv_all = {}, [], []
    for name, case in schemas.items():
        try:
            compiled, compile_s = timed(lambda: lib.compile(case["schema"]))
        except Exception as exc:  # noqa: BLE001  (a refused schema is a result)
            per_schema[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        ids = tok.encode(json.dumps(case["example"]))
        walk(lib, compiled, ids, tok.vocab_size)  # warm-up: a library's lazy per-grammar work is not per token
        fills, advs, ok = [], [], True
        for _ in range(repeats):
            f, a, good = walk(lib, compiled, ids, tok.vocab_size)
            fills += f
            advs += a
            ok = ok and good
        fills_all += fills
        adv_all += advs
        per_schema[name] = {"compile_ms": compile_s * 1e3, "tokens": len(ids), "example_accepted": ok,
                            "fill_us_median": statistics.median(fills) * 1e6,
                            "advance_us_median": statistics.median(advs) * 1e6}
    out: dict[str, Any] = {"schemas": per_schema}
    if fills_all:
        fills_all.sort()
        out.update(fill_us_median=statistics.median(fills_all) * 1e6,
                   fill_us_p90=fills_all[int(0.9 * (len(fills_all) - 1))] * 1e6,
                   advance_us_median=statistics.median(adv_all) * 1e6,
                   per_token_us_mean=(sum(fills_all) + sum(adv_all)) / len(fills_all) * 1e6,
                   compile_ms_median=statistics.median(s["compile_ms"] for s in per_schema.values() if "compile_ms" in s))
    return out


def coverage(lib: Lib, tok: Tokenizer) -> dict[str, str]:
    result = {}
    for feature, (schema, breaking) in FEATURES.items():
        try:
            compiled = lib.compile(schema)
        except Exception as exc:  # noqa: BLE001
            result[feature] = "error: " + str(exc).splitlines()[0][:160]
            continue
        try:
            result[feature] = "ignored" if lib.accepts_text(compiled, breaking, tok) else "ok"
        except Exception as exc:  # noqa: BLE001
            result[feature] = "error while matching: " + str(exc)[:120]
    return result


def mask_apply_us(vocab: int, rounds: int) -> float:
    """moemesh's own application of a bitmask (engine/constraints.apply_bitmasks) to one row."""
    logits = torch.randn(1, vocab)  # [1, V]
    bitmask = torch.randint(-2**31, 2**31 - 1, ((vocab + 31) // 32,), dtype=torch.int32)  # [W]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        apply_bitmasks(logits, [bitmask])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="walks per schema")
    ap.add_argument("--quick", action="store_true", help="one walk per schema")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(1)
    tok = Tokenizer.from_gguf(resolve_model_path("smollm2"))
    schemas = {k: v for k, v in json.loads(SCHEMAS.read_text()).items() if not k.startswith("_")}
    report: dict[str, Any] = {"vocab": tok.vocab_size, "repeats": args.repeats, "quick": args.quick,
                              "mask_apply_us": mask_apply_us(tok.vocab_size, 200), "libraries": {}}
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        try:
            lib, setup_s = timed(lambda: cls(tok))  # noqa: B023
        except ImportError as exc:
            report["libraries"][cls.name] = {"missing": str(exc)}
            continue
        entry = {"setup_ms": setup_s * 1e3}
        entry.update(measure(lib, tok, schemas, args.repeats))
        entry["coverage"] = coverage(lib, tok)
        report["libraries"][cls.name] = entry
        print(cls.name, json.dumps({k: v for k, v in entry.items() if k not in ("schemas", "coverage")}), flush=True)
    name = "grammar_libs_quick" if args.quick else "grammar_libs"
    write_results(RESULTS, name, report, markdown(report), sys.argv)
    print(markdown(report))


def markdown(report: dict) -> str:
    libs = report["libraries"]
    present = [n for n, e in libs.items() if "missing" not in e]
    lines = [f"# Constrained decoding libraries on SmolLM2's {report['vocab']}-token vocabulary",
             "", f"Teacher-forced walks over the examples of tests/data/json_schemas.json, {report['repeats']} "
             f"walk(s) each, one thread. Applying a bitmask to the logits (moemesh's `apply_bitmasks`, the same for all): "
             f"{report['mask_apply_us']:.0f} us per token.", "",
             "| library | setup (ms) | compile (ms, median) | bitmask (us/token, median) | p90 | advance (us/token) "
             "| mean total (us/token) | examples accepted |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in present:
        e = libs[n]
        acc = sum(1 for s in e["schemas"].values() if s.get("example_accepted"))
        if "fill_us_median" not in e:
            lines.append(f"| {n} | {e['setup_ms']:.0f} | - | - | - | - | - | 0/{len(e['schemas'])} |")
            continue
        lines.append(f"| {n} | {e['setup_ms']:.0f} | {e['compile_ms_median']:.1f} | {e['fill_us_median']:.1f} | "
                     f"{e['fill_us_p90']:.1f} | {e['advance_us_median']:.1f} | {e['per_token_us_mean']:.1f} | "
                     f"{acc}/{len(e['schemas'])} |")
    for n, e in libs.items():
        if "missing" in e:
            lines.append(f"| {n} | not installed | | | | | | |")
    lines += ["", "Schema features (ok: enforced; ignored: compiled, but an instance breaking it got through; "
              "error: refused):", "", "| feature | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for feature in FEATURES:
        cells = [libs[n]["coverage"][feature].replace("|", "/") for n in present]
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
