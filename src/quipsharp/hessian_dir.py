"""A directory of Hessians computed beforehand: ``quipsharp hessians`` writes it, ``quantize --hessians``
reads it, ``quipsharp merge-hessians`` adds several (issue 16, QuIP# §4's offline Hessians).

Layout::

    HDIR/hessians.json                  the manifest (below)
    HDIR/block_00000/group_00.safetensors   one exact accumulator (io.save_hessian) per group of
    ...                                     linears that read one input (q/k/v, gate/up, ...)

The manifest records what the sums depend on, and loading checks it against the model being
quantized: the model's tensor layout and weights (digests), its tokenizer (a digest of the
vocabulary), the dtype the forward passes ran in and the window length, plus one entry per
calibration shard (its token digest, windows and source) and, per block, the groups and the tokens
each file summed. The sums are exact (:class:`quipsharp.hessian.HessianAccumulator`), so directories
computed on different shards merge into exactly the statistics of one run over all of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quipsharp.errors import QuipSharpError
from quipsharp.hessian import HessianAccumulator
from quipsharp.io import atomic_write_text, load_hessian, save_hessian
from quipsharp.outputs import check_output, locked, publish_dir, staging_dir

logger = logging.getLogger(__name__)

HESSIANS_FORMAT = "quipsharp-hessians"
HESSIANS_VERSION = 1
MANIFEST = "hessians.json"
BLOCK_DIR = "block_{:05d}"
GROUP_FILE = "group_{:02d}.safetensors"
#: Manifest entries two directories must share to be merged, and a model must match to use them.
IDENTITY_KEYS = ("blocks_name", "structure", "weights", "tokenizer", "dtype", "ctx")
_IDENTITY_WORDS = {"blocks_name": "the model's block list", "structure": "the model's tensor names, shapes or dtypes",
                   "weights": "the model's weights", "tokenizer": "the tokenizer", "dtype": "the dtype",
                   "ctx": "the window length (--ctx)"}


class HessianDirError(QuipSharpError, ValueError):
    """A Hessian directory that is missing, damaged, or made for another model or settings."""


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's vocabulary (token → id, sorted) and its class: two tokenizers that
    turn text into different ids differ here."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    return h.hexdigest()


def is_hessian_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a manifest this module wrote (any version)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8")).get("format") == HESSIANS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class HessianDir:
    """An opened Hessian directory (or several merged on the fly): the manifest and its files."""

    paths: list[Path]
    manifests: list[dict[str, Any]]

    @property
    def identity(self) -> dict[str, Any]:
        return {k: self.manifests[0][k] for k in IDENTITY_KEYS}

    @property
    def shards(self) -> list[dict[str, Any]]:
        return [s for m in self.manifests for s in m["shards"]]

    @property
    def fingerprint(self) -> str:
        """A digest of the calibration shards (what a resumed run must share with the first)."""
        return hashlib.sha256(json.dumps(sorted(s["calibration"] for s in self.shards)).encode()).hexdigest()

    def describe(self) -> str:
        """For the model card: the shards' windows and sources."""
        windows = sum(s["windows"] for s in self.shards)
        sources = ", ".join(sorted({Path(s["source"]).name for s in self.shards}))
        return (f"Hessians from {', '.join(str(p) for p in self.paths)}: {windows} windows of "
                f"{self.identity['ctx']} tokens ({sources}), original inputs")

    def check_model(self, identity: dict[str, Any]) -> None:
        """Refuse, naming what differs, a model (``model_identity``) these Hessians were not made for."""
        differ = [_IDENTITY_WORDS[k] for k in IDENTITY_KEYS if self.identity[k] != identity.get(k)]
        if differ:
            raise HessianDirError(f"the Hessians in {self.paths[0]} do not fit this run: {', '.join(differ)} differ "
                                  "from theirs; compute them again for this model (quipsharp hessians)")

    def block(self, index: int) -> dict[str, HessianAccumulator]:
        """Block ``index``'s accumulators by linear name within the block (shared within a group), every
        directory's added exactly."""
        out: dict[str, HessianAccumulator] = {}
        for path, manifest in zip(self.paths, self.manifests, strict=True):
            if index >= len(manifest["blocks"]):
                raise HessianDirError(f"{path} holds Hessians for {len(manifest['blocks'])} blocks, not block {index}")
            for group in manifest["blocks"][index]["groups"]:
                try:
                    acc = load_hessian(path / group["file"])
                except (OSError, ValueError) as err:
                    raise HessianDirError(f"{path}: {err}") from err
                if acc.count != group["tokens"]:
                    raise HessianDirError(f"{path / group['file']} summed {acc.count} tokens, the manifest says "
                                          f"{group['tokens']}: the directory is damaged")
                names = group["names"]
                if names[0] in out:
                    if any(n not in out or out[n] is not out[names[0]] for n in names):
                        raise HessianDirError(f"{path}: block {index}'s groups differ from {self.paths[0]}'s")
                    out[names[0]].merge(acc)
                else:
                    for n in names:
                        out[n] = acc
        return out

    def __call__(self, index: int) -> dict[str, HessianAccumulator]:
        return self.block(index)


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not path.is_dir():
        raise HessianDirError(f"no Hessian directory at {path}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HessianDirError(f"{path} has no {MANIFEST}: not a quipsharp Hessian directory") from None
    except (OSError, ValueError) as err:
        raise HessianDirError(f"{file} is not readable JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != HESSIANS_FORMAT:
        raise HessianDirError(f"{path} is not a quipsharp Hessian directory")
    version = manifest.get("version")
    if not isinstance(version, int) or version > HESSIANS_VERSION:
        raise HessianDirError(f"{path} has Hessian directory version {version!r}; this quipsharp reads up to "
                              f"{HESSIANS_VERSION}")
    try:
        for k in IDENTITY_KEYS:
            manifest[k]
        for shard in manifest["shards"]:
            shard["calibration"], int(shard["windows"]), shard["source"]
        for block in manifest["blocks"]:
            for group in block["groups"]:
                if not group["names"] or Path(group["file"]).is_absolute() or ".." in Path(group["file"]).parts:
                    raise ValueError(group)
                int(group["tokens"])
    except (KeyError, TypeError, ValueError) as err:
        raise HessianDirError(f"{file} is damaged (bad entry {err})") from None
    return manifest


def open_hessians(paths: list[str | os.PathLike]) -> HessianDir:
    """Open one or more Hessian directories as one (their sums added when read); refuses directories
    made for different models or settings, and shards counted twice."""
    if not paths:
        raise HessianDirError("no Hessian directory given")
    resolved = [Path(p).expanduser().resolve() for p in paths]
    manifests = [_read_manifest(p) for p in resolved]
    first = {k: manifests[0][k] for k in IDENTITY_KEYS}
    for path, manifest in zip(resolved[1:], manifests[1:], strict=True):
        differ = [_IDENTITY_WORDS[k] for k in IDENTITY_KEYS if manifest[k] != first[k]]
        if differ:
            raise HessianDirError(f"{path} and {resolved[0]} were computed with different {', '.join(differ)}: "
                                  "they cannot be merged")
        if len(manifest["blocks"]) != len(manifests[0]["blocks"]):
            raise HessianDirError(f"{path} and {resolved[0]} hold different numbers of blocks")
    seen: dict[str, Path] = {}
    for path, manifest in zip(resolved, manifests, strict=True):
        for shard in manifest["shards"]:
            if shard["calibration"] in seen:
                raise HessianDirError(f"{path} and {seen[shard['calibration']]} both hold the calibration shard of "
                                      f"{shard['source']} ({shard['windows']} windows): it would count twice")
            seen[shard["calibration"]] = path
    return HessianDir(resolved, manifests)


class HessianWriter:
    """Writes a Hessian directory block by block into a staging directory beside ``out`` and puts it
    in place only when complete (an interrupted run leaves ``out`` as it was)."""

    def __init__(self, out: Path, identity: dict[str, Any], shards: list[dict[str, Any]]) -> None:
        self.out = out
        self.tmp = staging_dir(out)
        self.manifest: dict[str, Any] = {"format": HESSIANS_FORMAT, "version": HESSIANS_VERSION, **identity,
                                         "shards": shards, "blocks": []}

    def add_block(self, index: int, groups: list[list[str]], hessians: dict[str, HessianAccumulator]) -> None:
        if index != len(self.manifest["blocks"]):
            raise ValueError(f"blocks must be written in order: got {index}, expected {len(self.manifest['blocks'])}")
        entries = []
        for g, names in enumerate(groups):
            rel = f"{BLOCK_DIR.format(index)}/{GROUP_FILE.format(g)}"
            acc = hessians[names[0]]
            save_hessian(acc, self.tmp / rel)
            entries.append({"names": list(names), "file": rel, "tokens": acc.count})
        self.manifest["blocks"].append({"groups": entries})

    def finish(self) -> Path:
        atomic_write_text(self.tmp / MANIFEST, json.dumps(self.manifest, indent=1))
        publish_dir(self.tmp, self.out)
        return self.out

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_hessians(out: Path, identity: dict[str, Any], shards: list[dict[str, Any]], produce: Any) -> Path:
    """Run ``produce(add_block)`` (which calls ``add_block(i, groups, hessians)`` per block in order)
    and publish the directory at ``out`` (checked by the caller); the staging directory is removed on
    failure."""
    writer = HessianWriter(out, identity, shards)
    try:
        produce(writer.add_block)
        return writer.finish()
    except BaseException:
        writer.abandon()
        raise


def merge_hessian_dirs(paths: list[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Add the Hessians of several directories (other calibration shards of the same model and
    settings) into a new directory ``out``: exactly the sums one run over all the shards gives."""
    if len(paths) < 2:
        raise HessianDirError("merging needs at least two Hessian directories")
    source = open_hessians(paths)
    target = check_output(out, overwrite=overwrite, inputs=tuple(source.paths), replaceable=is_hessian_dir,
                          kind="quipsharp Hessian directory")
    with locked(target):
        def produce(add_block: Any) -> None:
            for i, block in enumerate(source.manifests[0]["blocks"]):
                merged = source.block(i)
                add_block(i, [g["names"] for g in block["groups"]], merged)

        return write_hessians(target, source.identity, source.shards, produce)
