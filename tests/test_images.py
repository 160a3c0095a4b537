"""Image input for Qwen3.5-MoE vs transformers on a tiny random checkpoint with its vision tower
(fp32): preprocessing, the tower's features, M-RoPE positions, logits with one and two images,
greedy decoding; images batched with text; images from an expert store; bad images refused."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from moemesh.batch import BatchLayout
from moemesh.engine.engine import Engine
from moemesh.engine.sampling_params import SamplingParams
from moemesh.loading.convert import convert
from moemesh.loading.experts import ExpertOptions
from moemesh.loading.loader import load_model
from moemesh.tokenizer import images as images_mod
from moemesh.tokenizer.images import ImageError, ImageSpec, open_image, preprocess
from tiny_families import PREPROCESSOR, image_processor, make_qwen3_5_moe

SIZES = [(40, 56), (24, 72), (9, 13), (200, 150)]  # the last two hit min_pixels and max_pixels


def picture(i: int) -> Image.Image:
    h, w = SIZES[i]
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_5_vl")
    return make_qwen3_5_moe(d), d


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(str(ckpt[1]), "fp32")


def prompt_with(loaded, n: int) -> list[int]:
    ph = loaded.images.placeholder()
    ids = [5, 6] + ph + [7, 8, 9]
    return ids + ([10] + ph + [11] if n == 2 else []) + [12, 13]


def hf_inputs(ids: list[int], pics: list, image_token: int) -> dict:
    b = image_processor()(pics, return_tensors="pt")
    return dict(input_ids=torch.tensor([ids]), pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                mm_token_type_ids=torch.tensor([[int(t == image_token) for t in ids]]))


def test_preprocessing_equals_transformers():
    spec = ImageSpec(patch=4, temporal_patch=2, merge=2, min_pixels=PREPROCESSOR["size"]["shortest_edge"],
                     max_pixels=PREPROCESSOR["size"]["longest_edge"])
    for i in range(len(SIZES)):
        ref = image_processor()([picture(i)], return_tensors="pt")
        got, grid = preprocess(picture(i), spec)
        assert [list(grid)] == ref["image_grid_thw"].tolist()
        torch.testing.assert_close(got, ref["pixel_values"], atol=1e-6, rtol=0)  # measured 1.2e-7


def test_spec_read_from_the_checkpoint(loaded):
    s = loaded.images.spec
    assert (s.patch, s.merge, s.min_pixels, s.max_pixels) == (4, 2, 256, 4096)


def test_tower_features_equal_transformers(ckpt, loaded):
    hf, _ = ckpt
    pics = [picture(0), picture(1)]
    b = image_processor()(pics, return_tensors="pt")
    with torch.no_grad():
        ref = torch.cat(hf.model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output)
    got = loaded.images.tower(b["pixel_values"], [tuple(g) for g in b["image_grid_thw"].tolist()])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # measured ~5e-8


@pytest.mark.parametrize("n", [1, 2])
def test_logits_with_images_match_transformers(ckpt, loaded, n):
    """One and two images: positions (M-RoPE) and logits equal transformers' within 1e-4 (measured ~3e-7)."""
    hf, _ = ckpt
    pics = [picture(0), picture(1)][:n]
    ids, media = loaded.images.prepare(prompt_with(loaded, n), pics)
    inputs = hf_inputs(ids, pics, loaded.images.tokens.image)
    ref_pos, ref_delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    assert torch.equal(media.positions, ref_pos[:, 0]) and media.delta == int(ref_delta)
    with torch.no_grad():
        ref = hf(**inputs).logits[0]  # [T, V]
    model = loaded.model
    cache = model.new_cache()
    cache.add_sequence(0)
    x = model.embed[torch.tensor(ids)].float()
    x[media.rows] = media.embeds
    got = model(torch.tensor(ids), media.positions, cache, BatchLayout([0], [len(ids)]), all_logits=True, embeds=x)
    assert (got - ref).abs().max().item() < 1e-4


def test_greedy_with_two_images_matches_transformers(ckpt, loaded):
    hf, _ = ckpt
    pics = [picture(0), picture(1)]
    ids, media = loaded.images.prepare(prompt_with(loaded, 2), pics)
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(ids, pics, loaded.images.tokens.image), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False)[0, len(ids):].tolist()
    eng = Engine(loaded.model, max_prefill_tokens=16)  # the image tokens span several prefill chunks
    (seq,) = eng.generate([ids], SamplingParams(temperature=0.0, max_tokens=12), media=[media])
    assert seq.output_ids == ref


def test_images_batched_with_text_equal_alone(loaded):
    ids, media = loaded.images.prepare(prompt_with(loaded, 1), [picture(1)])
    text = [3, 4, 5, 6, 7]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    alone = [Engine(loaded.model).generate([ids], params, media=[media])[0].output_ids,
             Engine(loaded.model).generate([text], params)[0].output_ids]
    together = Engine(loaded.model).generate([ids, text], params, media=[media, None])
    assert [s.output_ids for s in together] == alone


def test_images_through_an_expert_store(ckpt, loaded, tmp_path):
    """The store keeps the tower (trunk) and the image processor's config; lazy experts give the
    same tokens as the resident fp32 model."""
    store = convert(ckpt[1], tmp_path / "store", "fp32", progress=False)
    lazy = load_model(str(store), experts=ExpertOptions(slots=4))
    assert lazy.images is not None and lazy.images.spec == loaded.images.spec
    params = SamplingParams(temperature=0.0, max_tokens=8)
    runs = []
    for m in (loaded, lazy):
        ids, media = m.images.prepare(prompt_with(m, 2), [picture(0), picture(2)])
        runs.append(Engine(m.model).generate([ids], params, media=[media])[0].output_ids)
    assert runs[0] == runs[1]


def test_generate_cli_with_images(ckpt, tmp_path, capsys):
    from moemesh.cli import main

    files = []
    for i in (0, 1):
        f = tmp_path / f"p{i}.png"
        picture(i).save(f)
        files += ["--image", str(f)]
    rc = main(["generate", str(ckpt[1]), "--prompt-ids", "5,6,7", "-n", "6", "--json", "--quant", "none", *files])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    loaded = load_model(str(ckpt[1]), "fp32")
    ids, media = loaded.images.prepare(loaded.images.placeholder() * 2 + [5, 6, 7], [picture(0), picture(1)])
    ref = Engine(loaded.model).generate([ids], SamplingParams(temperature=0.0, max_tokens=6), media=[media])[0]
    assert out["token_ids"] == ref.output_ids and out["prompt_tokens"] == len(ids)


def test_bad_images_are_refused_clearly(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageError, match="cannot read"):
        open_image(tmp_path / "missing.png")
    buf = io.BytesIO()
    picture(0).save(buf, format="TIFF")
    with pytest.raises(ImageError, match="unsupported image format TIFF"):
        open_image(buf.getvalue())
    buf = io.BytesIO()
    picture(0).save(buf, format="PNG")
    monkeypatch.setattr(images_mod, "MAX_SOURCE_PIXELS", 1000)
    with pytest.raises(ImageError, match="over 1000 pixels"):
        open_image(buf.getvalue())
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess(Image.new("RGB", (1000, 4)), ImageSpec(patch=4))


def test_text_only_model_refuses_images(tmp_path, capsys):
    """A Qwen3-Next checkpoint has no tower: --image is a clear error, not a crash."""
    from transformers import AutoConfig

    from moemesh.cli import main
    from tiny_families import V, make_text_checkpoint

    cfg = AutoConfig.for_model("qwen3_next", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, intermediate_size=32, moe_intermediate_size=16,
                               shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                               linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=8,
                               linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])
    make_text_checkpoint(cfg, tmp_path / "m")
    f = tmp_path / "p.png"
    picture(0).save(f)
    assert main(["generate", str(tmp_path / "m"), "--prompt-ids", "5,6", "-n", "2", "--image", str(f)]) == 2
    assert "does not take images" in capsys.readouterr().err
