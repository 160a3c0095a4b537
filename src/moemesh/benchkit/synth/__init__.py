"""Synthetic benchmark models: real models' per-layer shapes with seeded random weights, written as
expert stores, GGUFs (llama.cpp's own architectures) and HF checkpoints, once, atomically, under a cache
directory. Used by bench/ and by the tests (see ``models`` for the catalogue)."""
