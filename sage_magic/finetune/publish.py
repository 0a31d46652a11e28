"""Publishing a local fine-tune's adapter into a folder a vLLM server we do not own reads (shared storage).

vLLM's LoRA filesystem resolver (``VLLM_PLUGINS=lora_filesystem_resolver``, ``VLLM_LORA_RESOLVER_CACHE_DIR=
DIR``) answers a request for model ``X`` by loading ``DIR/X`` if ``DIR/X/adapter_config.json`` is a LoRA whose
``base_model_name_or_path`` equals the server's ``--model`` value, exactly (vllm/plugins/lora_resolvers/
filesystem_resolver.py). So the published copy gets that field rewritten to the server's base, and a folder
name that carries the adapter's fingerprint (``NAME-<fp8>``): a colleague's fine-tune of the same name lands
in another folder, and a retrained one under a new name, which the server loads afresh (it caches adapters by
name and never rereads a folder it has loaded).

The copy is written beside the target and renamed into place, so the resolver never sees half an adapter.
A marker file in the copy records what it is, which is how a folder of the same name that holds another
adapter is told apart and refused (:class:`AdapterConflict`) unless asked to replace it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import AdapterConflict, SageError
from ..core.files import utc_now, write_json_atomic
from ..core.fingerprint import adapter_digest
from .catalog import ADAPTER_CONFIG, FineTune

#: What a published folder says about itself (vLLM ignores files it does not know).
MARKER = ".sage_published.json"
#: The adapter's own files; the rest of a checkpoint folder (optimizer state, trainer state) stays home.
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                  "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class Published:
    """A published adapter: the model name to request, where it lies, and what it is."""

    name: str
    path: Path
    fingerprint: str
    base: str
    copied: bool  # False when the same adapter was already there


def published_name(ft: FineTune, publish_as: str | None = None) -> str:
    """The model name a server answers the fine-tune under: ``--publish-as`` as given, else NAME-<fp8>."""
    if publish_as is not None:
        if not publish_as or "/" in publish_as or publish_as.startswith("."):
            raise SageError(f"--publish-as {publish_as!r} is not a usable folder name: give a plain name such as "
                            f"{ft.name}-mine (no '/', not starting with '.').")
        return publish_as
    return f"{ft.name}-{adapter_digest(ft.adapter_dir)[:8]}"


def read_marker(folder: Path) -> dict | None:
    """What a published folder holds by its marker (None: no marker, or not ours to read)."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def publish(ft: FineTune, publish_dir: Path, *, server_base: str, name: str, replace: bool = False) -> Published:
    """Copy ``ft``'s adapter to ``publish_dir/name`` for a server whose ``--model`` is ``server_base``.

    The same adapter already there is reused (nothing copied); another one is an :class:`AdapterConflict`
    unless ``replace``."""
    if not publish_dir.is_dir():
        raise SageError(f"The publish folder {publish_dir} does not exist. Create it on the storage the server "
                        "mounts (and start the server with VLLM_LORA_RESOLVER_CACHE_DIR pointing at it), or "
                        "pass another --publish-dir / SAGE_PUBLISH_DIR.")
    fingerprint = adapter_digest(ft.adapter_dir)
    target = publish_dir / name
    marker = read_marker(target) if target.exists() else None
    if marker is not None and marker.get("fingerprint") == fingerprint and marker.get("base") == server_base:
        return Published(name, target, fingerprint, server_base, copied=False)
    if target.exists() and not replace and (marker is None or marker.get("fingerprint") != fingerprint):
        owner = (f"fine-tune {marker.get('finetune')!r} published from {marker.get('source')} on "
                 f"{marker.get('published')}" if marker else "an adapter sage_magic did not publish")
        raise AdapterConflict(
            f"{target} already holds {owner}, not your {ft.name!r} (fingerprint {fingerprint[:8]}); a server asked "
            f"for {name!r} would answer with it. Publish yours under another name with --publish-as OTHER_NAME, "
            f"or overwrite it with --replace (whoever uses {name!r} then gets yours).")
    staging = publish_dir / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o755)
    try:
        for file in _ADAPTER_FILES:
            if (ft.adapter_dir / file).is_file():
                shutil.copy2(ft.adapter_dir / file, staging / file)
        config = json.loads((staging / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = server_base  # what the resolver compares with the server's --model
        write_json_atomic(staging / ADAPTER_CONFIG, config, mode=0o644)
        write_json_atomic(staging / MARKER, {"finetune": ft.name, "fingerprint": fingerprint, "base": server_base,
                                             "source": str(ft.adapter_dir), "published": utc_now()}, mode=0o644)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Published(name, target, fingerprint, server_base, copied=True)


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished copy to ``target``; an older folder there (``--replace``) is moved aside first and
    removed after, so a reader sees the old adapter or the new one, never a mix (between the two renames, for
    an instant, neither: a request then is told the model does not exist and can be asked again)."""
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def server_settings(published: Published) -> str:
    """The server-side settings that make a published adapter loadable, as a person pastes them."""
    return (f"VLLM_PLUGINS=lora_filesystem_resolver VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
            f"VLLM_LORA_RESOLVER_CACHE_DIR={published.path.parent} (as the server mounts it) and "
            f"--enable-lora --max-lora-rank >= the adapter's rank, with --model {published.base}")
