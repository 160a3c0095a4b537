"""Will benchkit/synth/hf.py's fp32 HF checkpoint of a synthetic model fit here? Sized from the HF
config alone, before anything is written: on disk the trunk in bf16 plus every expert in fp32,
in RAM (transformers, ``dtype=float32``) everything in fp32.

fp32 experts of the real shapes are big (3 matrices x experts x hidden x expert width x 4 B per
MoE layer): Qwen3-30B-A3B 2.4 GB, Mixtral-8x7B 5.6 GB, gpt-oss-120b 12.7 GB, DeepSeek-V3 45 GB.
On a machine with 24 GB RAM and ~32 GB free disk that allows Qwen3 up to ~8 layers, Mixtral
~3 layers, gpt-oss-120b one layer, and no DeepSeek-V3 at all.
"""
from __future__ import annotations

import shutil
from pathlib import Path

GB = 1e9
DISK_MARGIN = 2**30  # left free after writing
RAM_HEADROOM = 2**30  # python, torch, transformers and the activations beside the weights


def expert_layer_bytes(cfg: dict) -> int:
    """fp32 bytes of one MoE layer's experts (with gpt-oss's fp32 biases)."""
    from moemesh.models import get_arch

    a = get_arch(cfg["model_type"]).args_from_config(cfg)
    d, inter = cfg["hidden_size"], a.moe_intermediate_size
    per = 3 * d * inter + (2 * inter + d if cfg["model_type"] == "gpt_oss" else 0)
    return 4 * a.num_experts * per


def trunk_params(cfg: dict) -> int:
    """Parameters outside the routed experts (embedding, head, attention, routers, shared experts;
    norms and biases left out: an estimate within a fraction of a percent)."""
    from moemesh.models import get_arch

    a = get_arch(cfg["model_type"]).args_from_config(cfg)
    d, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    if cfg.get("q_lora_rank") is not None or cfg.get("kv_lora_rank"):  # MLA
        h, ql, kl = cfg["num_attention_heads"], cfg.get("q_lora_rank") or 0, cfg["kv_lora_rank"]
        nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        q = d * ql + ql * h * (nope + rope) if ql else d * h * (nope + rope)
        attn = q + d * (kl + rope) + kl * h * (nope + vd) + h * vd * d
    else:
        h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or d // h
        attn = 2 * d * h * hd + 2 * d * kv * hd
    shared = 3 * d * a.moe_intermediate_size * int(cfg.get("n_shared_experts") or 0)
    dense = 3 * d * int(cfg.get("intermediate_size") or 0)
    n_moe = len(a.moe_layers)
    return 2 * v * d + n * attn + n_moe * (a.num_experts * d + shared) + (n - n_moe) * dense


def estimate(cfg: dict) -> dict:
    from moemesh.models import get_arch

    n_moe = len(get_arch(cfg["model_type"]).args_from_config(cfg).moe_layers)
    per, trunk = expert_layer_bytes(cfg), trunk_params(cfg)
    return {"expert_layer_bytes": per, "moe_layers": n_moe, "disk_bytes": 2 * trunk + n_moe * per,
            "ram_bytes": 4 * trunk + n_moe * per}


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def require_fits(cfg: dict, where: Path, check_disk: bool = True) -> dict:
    """SystemExit with the numbers when the checkpoint would not fit on the disk holding ``where``
    or transformers could not hold it in RAM; else the estimate."""
    est = estimate(cfg)
    where = Path(where)
    while not where.exists():
        where = where.parent
    free, avail = shutil.disk_usage(where).free, mem_available()
    what = (f"{cfg['model_type']}, {cfg['num_hidden_layers']} layer(s): fp32 experts {est['expert_layer_bytes'] / GB:.1f} GB "
            f"per MoE layer x {est['moe_layers']}")
    problems = []
    if check_disk and est["disk_bytes"] + DISK_MARGIN > free:
        problems.append(f"the checkpoint needs {est['disk_bytes'] / GB:.1f} GB on disk, {free / GB:.1f} GB free at {where}")
    if est["ram_bytes"] + RAM_HEADROOM > avail:
        problems.append(f"transformers needs {est['ram_bytes'] / GB:.1f} GB of RAM for its fp32 weights (+ "
                        f"{RAM_HEADROOM / GB:.1f} GB headroom), {avail / GB:.1f} GB available")
    if problems:
        raise SystemExit(f"synth_hf: an fp32 HF checkpoint of {what} does not fit here: {'; '.join(problems)}. "
                         "Use fewer --layers (real shapes per layer: Qwen3-30B-A3B 2.4 GB, Mixtral-8x7B 5.6 GB, "
                         "gpt-oss-120b 12.7 GB, DeepSeek-V3 45 GB, which cannot run on a 24 GB machine at any depth).")
    return est
