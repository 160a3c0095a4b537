"""After a build, the mapped pages of checkpoint tensors the model no longer views are paged out
(weights/page_out.py): the model's output does not change, and the advised ranges never touch
a tensor the model keeps."""
from __future__ import annotations

import mmap

import torch

from moemesh.batch import BatchLayout
from moemesh.loading.loader import load_model
from moemesh.weights.page_out import PAGE, page_out_unused, page_out_view
from moemesh.weights.safetensors_io import SafetensorsCheckpoint


def decode(model, n: int = 6) -> torch.Tensor:
    cache = model.new_cache()
    cache.add_sequence(0)
    return torch.cat([model(torch.tensor([t]), torch.tensor([i]), cache, BatchLayout([0], [1]))
                      for i, t in enumerate([1, 5, 9, 2, 7, 3][:n])])


def test_ranges_outside_kept_tensors_whole_pages_only():
    m = mmap.mmap(-1, 10 * PAGE)
    base = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
    m[PAGE + 5 : PAGE + 8] = b"abc"  # a written (anonymous) page survives the advice
    keep = [(base + 3 * PAGE + 100, base + 4 * PAGE + 10)]  # touches pages 3 and 4
    advised = page_out_unused([m], keep)
    assert advised in (0, (3 + 5) * PAGE)  # pages 0-2 and 5-9; 0 on a kernel without MADV_PAGEOUT
    assert m[PAGE + 5 : PAGE + 8] == b"abc"


def test_page_out_view_whole_pages_of_a_view_only():
    m = mmap.mmap(-1, 10 * PAGE)
    whole = torch.frombuffer(m, dtype=torch.uint8)  # [10 pages]
    supported = page_out_unused([mmap.mmap(-1, 2 * PAGE)], []) > 0
    assert page_out_view([m], whole[PAGE + 1 : 4 * PAGE + 1]) == (2 * PAGE if supported else 0)  # pages 2, 3
    assert page_out_view([m], whole[PAGE + 1 : 2 * PAGE]) == 0  # no whole page inside
    assert page_out_view([m], torch.zeros(4 * PAGE, dtype=torch.uint8)) == 0  # not a view of the map


def rss_file_kib() -> int:
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("RssFile"))


def test_quantized_load_pages_out_float_weights_and_decodes_the_same(tiny_checkpoints, monkeypatch):
    _, d = tiny_checkpoints["qwen3_moe-norm"]
    paged = load_model(str(d), "int4").model  # float checkpoint quantized at load, its pages then released
    monkeypatch.setattr(SafetensorsCheckpoint, "release_unused", lambda self, model: 0)
    kept = load_model(str(d), "int4").model
    assert torch.equal(decode(paged), decode(kept))  # re-faulted rows (embedding) read the same bytes


def test_release_drops_resident_file_pages(tmp_path):
    """A file mapped only here, every page touched, then released: its resident pages go (pages
    another mapping also holds would stay: MADV_PAGEOUT skips shared pages)."""
    from moemesh.weights.safetensors_io import write_safetensors

    write_safetensors(tmp_path / "model.safetensors", [("w", torch.randn(2048, 1024))])  # 8 MiB
    ck = SafetensorsCheckpoint(tmp_path)
    assert float(ck.get("w").sum()) == float(ck.get("w").sum())  # touch every page
    before = rss_file_kib()
    advised = page_out_unused([f.mapping() for f in ck.files.values()], [])
    if advised:  # a kernel without MADV_PAGEOUT advises nothing
        assert rss_file_kib() <= before - 6 * 1024


def test_row_tables_are_faulted_back_in_from_a_thread(tmp_path):
    """A released table's pages come back mapped (RssFile) from prefault_in_background, values unchanged;
    row_tables names an approximate head's rescoring table beside the embedding."""
    from moemesh.layers.head import OutputHead
    from moemesh.weights.page_out import prefault_in_background, row_tables
    from moemesh.weights.safetensors_io import write_safetensors

    write_safetensors(tmp_path / "model.safetensors", [("w", torch.randn(2048, 1024))])  # 8 MiB
    ck = SafetensorsCheckpoint(tmp_path)
    w = ck.get("w")
    total = float(w.sum())  # every page touched
    if not page_out_unused([f.mapping() for f in ck.files.values()], []):
        return  # a kernel without MADV_PAGEOUT: nothing was released
    low = rss_file_kib()
    prefault_in_background([w]).join(timeout=60)
    if populate_read_supported():  # (else MADV_WILLNEED: read ahead into the page cache, mapped on first touch)
        assert rss_file_kib() >= low + 6 * 1024
    assert float(w.sum()) == total
    model = torch.nn.Module()
    model.embed, model.lm_head = w[:8], OutputHead(w, approx=torch.nn.Identity())
    assert [t.data_ptr() for t in row_tables(model)] == [w.data_ptr(), w.data_ptr()]


def populate_read_supported() -> bool:
    import ctypes

    from moemesh.weights.page_out import MADV_POPULATE_READ

    m = mmap.mmap(-1, PAGE)
    addr = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(addr, PAGE, MADV_POPULATE_READ) == 0


def test_resident_gguf_load_pages_out_what_it_copied(tmp_path, monkeypatch):
    """A GGUF loaded with every expert resident: the file pages the load read and the model no longer
    views (its experts and trunk copied into huge pages) are paged out; the output is unchanged."""
    from moemesh.benchkit.synth import whole, whole_write
    from moemesh.loading.gguf_checkpoint import GGUFCheckpoint

    path = whole_write.write(whole.tiny_spec("qwen3-30b-a3b"), tmp_path, progress=False)
    advised: list[int] = []
    maps: list[tuple[int, int]] = []
    real = GGUFCheckpoint.release_unused

    def release(self, model):
        for m in self.file.mappings():
            base = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
            maps.append((base, base + len(m)))
        advised.append(real(self, model))
        return advised[-1]

    monkeypatch.setattr(GGUFCheckpoint, "release_unused", release)
    paged = load_model(str(path), "auto").model
    raws = [m.raw.data_ptr() for m in paged.modules() if isinstance(getattr(m, "raw", None), torch.Tensor)]
    assert raws and maps  # the K-quant rows (experts, trunk) were copied out of the file's map (huge pages):
    assert not any(lo <= p < hi for p in raws for lo, hi in maps)  # no decode faults them in from disk
    supported = page_out_unused([mmap.mmap(-1, 2 * PAGE)], []) > 0  # (a kernel without MADV_PAGEOUT advises nothing)
    assert len(advised) == 1 and (advised[0] >= whole.expert_bytes(whole.tiny_spec("qwen3-30b-a3b")) // 2 or not supported)
    monkeypatch.setattr(GGUFCheckpoint, "release_unused", lambda self, model: 0)
    kept = load_model(str(path), "auto").model
    assert torch.equal(decode(paged), decode(kept))


def test_build_releases_the_views_it_concatenates(tmp_path, monkeypatch):
    """A resident GGUF build joins each expert's gate and up rows (a copy), then hands both file views to
    the source's release_view at once (their pages go before the load ends); the output is unchanged."""
    from moemesh.benchkit.synth import whole, whole_write
    from moemesh.loading.gguf_checkpoint import GGUFSource

    spec = whole.tiny_spec("qwen3-30b-a3b")
    path = whole_write.write(spec, tmp_path, progress=False)
    released: list[int] = []
    real = GGUFSource.release_view
    monkeypatch.setattr(GGUFSource, "release_view", lambda self, t: released.append(t.numel()) or real(self, t))
    model = load_model(str(path), "auto").model
    assert len(released) >= 2 * spec.layers * spec.experts  # gate and up of every expert (and fused trunk rows)
    monkeypatch.setattr(GGUFSource, "release_view", lambda self, t: 0)
    assert torch.equal(decode(model), decode(load_model(str(path), "auto").model))
