"""Tiny random checkpoints of the newer families (issue 24), built with transformers' own classes.

Each builder returns (reference model in eval mode, checkpoint dir). Routers get larger weights,
norms non-unit weights and correction biases random values, so a wrong eps, a missing norm or an
ignored bias changes the logits. Multimodal families are written the way their published
checkpoints are (the text model nested under a prefix, experts one tensor per expert where the
release does so); transformers reading the file back gives the same logits (checked in the tests).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

V = 160


def randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] > 1:
                p.normal_(0, 0.5)  # routers: routing is not a near-tie
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)


def text_configs() -> dict[str, object]:
    from transformers import AutoConfig

    common = dict(vocab_size=V, max_position_embeddings=256)
    return {
        "glm4_moe": AutoConfig.for_model(
            "glm4_moe", **common, num_hidden_layers=3, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.0,
            attention_bias=True, use_qk_norm=True),
        "glm4_moe-nonorm": AutoConfig.for_model(
            "glm4_moe", **common, num_hidden_layers=2, hidden_size=48, intermediate_size=40, moe_intermediate_size=12,
            num_attention_heads=6, num_key_value_heads=2, n_routed_experts=6, num_experts_per_tok=3,
            n_shared_experts=2, first_k_dense_replace=0, norm_topk_prob=False, use_qk_norm=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)),
        # GLM-5: an indexer keeps 5 keys per query (prompts here are longer), the middle layer reuses its pick
        "glm_moe_dsa": AutoConfig.for_model(
            "glm_moe_dsa", **common, num_hidden_layers=3, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=16, qk_rope_head_dim=4,
            qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, index_topk=5, index_head_dim=8, index_n_heads=2, index_topk_pattern="FSF"),
        "minimax_m2": AutoConfig.for_model(
            "minimax_m2", **common, num_hidden_layers=2, hidden_size=32, intermediate_size=16, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, rotary_dim=8, num_local_experts=8, num_experts_per_tok=2,
            bos_token_id=1, eos_token_id=2),
    }


def make_text_checkpoint(config, directory: Path, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    randomize(model)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    return model


def per_expert(prefix: str, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers 5 holds experts fused ([E, 2I, D] gate_up, [E, D, I] down); releases that store
    one tensor per expert name them experts.E.{gate,up,down}_proj.weight."""
    if name.endswith("mlp.experts.gate_up_proj"):
        base = prefix + name[: -len("gate_up_proj")]
        out = {}
        for e in range(t.shape[0]):
            g, u = t[e].chunk(2, dim=0)
            out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = g.contiguous(), u.contiguous()
        return out
    if name.endswith("mlp.experts.down_proj"):
        base = prefix + name[: -len("down_proj")]
        return {f"{base}{e}.down_proj.weight": t[e].contiguous() for e in range(t.shape[0])}
    return {prefix + name: t.contiguous()}


def make_kimi_k25(directory: Path, seed: int = 0):
    """Kimi K2.5 as Moonshot publishes it: language_model.model.* (experts per expert),
    language_model.lm_head.weight, vision_tower.* beside it."""
    from safetensors.torch import save_file
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    text = dict(model_type="kimi_k2", vocab_size=V, max_position_embeddings=256, hidden_size=32, intermediate_size=48,
                moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=12, kv_lora_rank=16,
                qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=8, num_experts_per_tok=2,
                n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
    vision = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2)
    cfg = Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=32, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Kimi_K25ForConditionalGeneration(cfg).eval()
    randomize(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.model.language_model.state_dict().items():
        tensors.update(per_expert("language_model.model.", name, t))
    tensors["language_model.lm_head.weight"] = model.lm_head.weight.detach().clone()
    tensors.update({"vision_tower." + n: t.contiguous() for n, t in model.model.vision_tower.state_dict().items()})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    cfg.save_pretrained(directory)
    model.generation_config.eos_token_id = None
    return model


# the image processor of the tiny Qwen3.5 (4-pixel patches, so small images make a few dozen tokens)
PREPROCESSOR = dict(patch_size=4, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                    size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})


def image_processor():
    """transformers' own processor for the tiny Qwen3.5's images (the reference)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**PREPROCESSOR)


def qwen3_5_config(**text_overrides):
    from transformers import Qwen3_5MoeConfig

    text = dict(vocab_size=V, max_position_embeddings=256, hidden_size=32, moe_intermediate_size=16,
                shared_expert_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_experts=8, num_experts_per_tok=2, linear_num_value_heads=4, linear_num_key_heads=2,
                linear_key_head_dim=8, linear_value_head_dim=6,
                # 12 rotary dims: 6 frequencies, two per M-RoPE axis (time, row, column), interleaved
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75,
                                     mrope_section=[2, 2, 2], mrope_interleaved=True))
    text.update(text_overrides)
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64)
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, image_token_id=V - 4, video_token_id=V - 3,
                            vision_start_token_id=V - 2, vision_end_token_id=V - 1)


def make_qwen3_5_moe(directory: Path, fused: bool = True, seed: int = 0, config=None):
    """Qwen3.5-MoE with its vision tower. fused: each layer's experts as the two 3-D tensors
    (gate_up_proj [E, 2I, D], down_proj [E, D, I]) the release ships; else transformers'
    save_pretrained layout (one tensor per expert)."""
    from safetensors.torch import save_file
    from transformers import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3_5MoeForConditionalGeneration(config or qwen3_5_config()).eval()
    randomize(model)
    with torch.no_grad():  # (1 + w) norms: random w around 0, not around 1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "linear_attn" not in name and "visual" not in name:
                p.copy_(0.2 * torch.randn_like(p))
    model.generation_config.eos_token_id = None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    if fused:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in model.state_dict().items()}, directory / "model.safetensors")
        model.config.save_pretrained(directory)
    else:
        model.save_pretrained(directory)
    return model


# a Qwen-style chat template, shortened: an image part is written as Qwen3.5's template writes it
VISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VISION_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def make_qwen3_5_chat(directory: Path, seed: int = 0):
    """A tiny Qwen3.5-MoE with its vision tower, a byte-level BPE tokenizer and a chat template that
    renders image parts (what ``moemesh serve`` needs); the config's image ids are the tokenizer's."""
    from scripted_ckpt import save_tokenizer, train_tokenizer

    tok = train_tokenizer(["Describe the picture. What is in this image? Compare the two images."] * 4,
                          VISION_SPECIAL, vocab_size=300)
    cfg = qwen3_5_config(vocab_size=tok.get_vocab_size(), max_position_embeddings=512)
    cfg.image_token_id, cfg.video_token_id = tok.token_to_id("<|image_pad|>"), tok.token_to_id("<|video_pad|>")
    cfg.vision_start_token_id, cfg.vision_end_token_id = tok.token_to_id("<|vision_start|>"), tok.token_to_id(
        "<|vision_end|>")
    model = make_qwen3_5_moe(directory, seed=seed, config=cfg)
    save_tokenizer(tok, directory, eos=["<|im_end|>", "<|endoftext|>"])
    (directory / "chat_template.jinja").write_text(VISION_TEMPLATE)
    return model


def check_lazy_equals_resident(ckpt_dir: Path, tmp_path: Path) -> None:
    """Converted to an int4 store: lazy experts with one token's worth of slots (prefetch on) decode
    the resident model's greedy and sampled tokens, and really read experts (misses)."""
    from moemesh.engine.engine import Engine
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.loading.convert import convert
    from moemesh.loading.experts import ExpertOptions
    from moemesh.loading.loader import load_model

    store = convert(ckpt_dir, tmp_path / "store", "int4", progress=False)
    resident = load_model(str(store))
    prompts = [list(range(5, 30)), [7, 8, 9], [40, 41, 42, 43, 44, 45]]

    def run(loaded, greedy: bool) -> list[list[int]]:
        params = [SamplingParams(temperature=0.0 if greedy else 0.9, seed=7 + i, max_tokens=8) for i in range(3)]
        return [s.output_ids for s in Engine(loaded.model).generate(prompts, params)]

    lazy = load_model(str(store), experts=ExpertOptions(slots=resident.args.top_k, prefetch=True))
    assert run(lazy, True) == run(resident, True)
    assert run(lazy, False) == run(resident, False)
    assert lazy.provider.stats()["misses"] > 0
