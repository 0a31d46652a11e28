"""Content identities: what a merged model was made from, and what a running server serves.

A fingerprint changes exactly when serving would give different answers: the adapter's bytes, or the base
model's config and weight files. Base weights are identified by name, size and mtime rather than hashed
(a 7B base is ~15 GB); adapters are small enough to hash, and the hash is cached by (size, mtime) so a warm
reuse in the same process costs no I/O beyond a stat.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def stat_key(path: Path) -> tuple[str, int, int]:
    """(path, size, mtime in ns): what a cache of a file's content is keyed by."""
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)
def _hash_file(key: tuple[str, int, int]) -> str:
    digest = hashlib.sha256()
    with open(key[0], "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, cached until its size or mtime changes."""
    return _hash_file(stat_key(path))


def base_identity(model_dir: Path) -> str:
    """Identity of a model folder: its config bytes plus name/size/mtime of every weight file."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode())
    digest.update(file_digest(model_dir / "config.json").encode())
    for weight in sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        name, size, mtime = stat_key(weight)
        digest.update(f"{Path(name).name}:{size}:{mtime}".encode())
    return digest.hexdigest()[:32]


def adapter_digest(adapter_dir: Path) -> str:
    """Identity of a LoRA adapter: the hash of its config and weights."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        path = adapter_dir / name
        if path.is_file():
            digest.update(name.encode() + file_digest(path).encode())
    return digest.hexdigest()[:32]


def combine(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
