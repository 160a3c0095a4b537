"""Random but valid tensor bytes for the whole synthetic models, fast: a 32 MiB pool of random
words drawn once, each 16 MiB chunk a slice of it at a random offset XORed with a random word
(~3 GB/s; numpy's generators alone draw ~0.1-0.2 GB/s here, minutes per 61 GB), then every block's
scale fields set to a sane value:

* MXFP4: the e8m0 exponent byte 2^-8 .. 2^-6 (picked per block from its own random bits); with
  e2m1 codes up to 6 a weight stays below 0.1, so 36 layers' activations stay finite;
* Q4_K: fp16 d and dmin 2^-11; Q8_0: fp16 d 2^-10 (the rest of every block: random bits, all valid).

Every chunk depends only on (seed, tensor index, chunk index): a resumed file is the same bytes as
one written in one go."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 16 << 20  # bytes per chunk (rounded down to whole blocks)
POOL_WORDS = (32 << 20) // 8
F16_FIELDS = {"Q8_0": ((0, 2**-10),), "Q4_0": ((0, 2**-10),), "Q4_K": ((0, 2**-11), (2, 2**-11))}
BLOCK = {"MXFP4": (32, 17), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144)}


def pool(seed: int) -> np.ndarray:
    """uint64 [POOL_WORDS]: the random words every chunk is cut from."""
    return np.random.default_rng([seed, 0xB10C]).integers(0, 2**64, POOL_WORDS, dtype=np.uint64, endpoint=False)


def fix_scales(raw: np.ndarray, qtype: str) -> None:
    """raw: uint8 [n_blocks, block_bytes], in place."""
    if qtype == "MXFP4":
        raw[:, 0] = 119 + raw[:, 0] % 3  # e8m0: 2^-8 .. 2^-6
        return
    for off, value in F16_FIELDS[qtype]:
        raw[:, off:off + 2] = np.array([value], np.float16).view(np.uint8)


def block_chunks(qtype: str, total: int, words: np.ndarray, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """uint8 chunks of valid ``qtype`` blocks summing to ``total`` bytes."""
    size = BLOCK[qtype][1]
    step = CHUNK // (size * 8) * size * 8  # whole blocks and whole words
    done = 0
    while done < total:
        n = min(step, total - done)
        nw = -(-n // 8)
        off = int(rng.integers(0, len(words) - nw + 1))
        chunk = words[off:off + nw] ^ rng.integers(0, 2**64, dtype=np.uint64, endpoint=False)  # [nw]
        raw = chunk.view(np.uint8)[:n].reshape(-1, size)  # [blocks, block bytes]
        fix_scales(raw, qtype)
        yield raw.reshape(-1)
        done += n


def small_tensor(role: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """fp32 tensors (norms, routers, biases, sinks) at scales that keep the activations tame."""
    scale = {"norm": 0.1, "router": 0.05, "bias": 0.01, "expert_bias": 0.01, "sinks": 1.0}[role]
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def tensor_chunks(role: str, shape: tuple[int, ...], qtype: str, nbytes: int, seed: int, index: int,
                  words: np.ndarray) -> Iterator[np.ndarray]:
    """The bytes of tensor ``index`` of a whole model, in chunks (deterministic in seed and index)."""
    rng = np.random.default_rng([seed, index])
    if qtype == "F32":
        yield small_tensor(role, shape, rng).reshape(-1).view(np.uint8)
        return
    yield from block_chunks(qtype, nbytes, words, rng)
