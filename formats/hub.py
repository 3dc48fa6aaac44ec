"""Resolve a Hugging Face hub id (model, tokenizer or dataset) to a directory in the local hub cache.

`dataprep convert hf:ORG/NAME`, `dataprep pack --tokenizer ORG/NAME` and the trainer's `model.path` accept hub
ids as well as local paths. Lives in `formats/` because both sides need it and the trainer must not import
`dataprep`. Offline by default: nothing is downloaded unless the caller passes `allow_download=True` (the CLI's
explicit flag); a missing id gets an error that says which command fetches it.

The cache is the one huggingface_hub uses (HF_HUB_CACHE / HF_HOME), laid out as
`<cache>/<models|datasets>--ORG--NAME/{refs/main, snapshots/<commit>/..., blobs/...}`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

RepoType = Literal["model", "dataset"]

# ORG/NAME (or NAME) as the hub spells repository ids, optionally @revision.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[A-Za-z0-9._/-]+)?$")


class HubNotCachedError(FileNotFoundError):
    """A hub id that is not in the local cache (and downloading was not allowed)."""


def looks_like_repo_id(spec: str) -> bool:
    """`ORG/NAME` or `NAME`, optionally `@REVISION`, that is not a path on disk."""
    return bool(_REPO_ID.match(spec)) and not os.path.exists(spec) and not spec.startswith((".", "/", "~"))


def resolve(
    spec: str,
    repo_type: RepoType = "model",
    *,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local directory for `spec`: the path itself when it exists, else the cached snapshot of the hub id
    `spec` (`ORG/NAME[@REVISION]`; an `hf:` prefix is allowed).

    Raises HubNotCachedError (a FileNotFoundError) with the command to run when the id is not cached, and
    FileNotFoundError for a path that does not exist and is no hub id.
    """
    if spec.startswith("hf:"):
        spec = spec[3:]
    if os.path.exists(spec):
        return Path(spec)
    if not looks_like_repo_id(spec):
        raise FileNotFoundError(f"path not found: {spec}")
    repo_id, _, revision = spec.partition("@")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        local = snapshot_download(
            repo_id, repo_type=repo_type, revision=revision or None, cache_dir=cache_dir,
            local_files_only=not allow_download,
        )
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        flag = " --repo-type dataset" if repo_type == "dataset" else ""
        raise HubNotCachedError(
            f"{spec} is not a local path and this {kind} is not in the Hugging Face cache ({where}); "
            f"fetch it with `hf download {repo_id}{flag}` (nothing is downloaded without it)"
        ) from None
    except Exception as exc:  # repository not found, gated, network errors when downloading was allowed
        raise HubNotCachedError(f"cannot get {kind} {spec} from the Hugging Face hub: {type(exc).__name__}: {exc}") from exc
    return Path(local)


_SNAPSHOT = re.compile(r"(?:^|/)(models|datasets)--([^/]+)/snapshots/[0-9a-f]+/?$")


def repo_id_of(directory: str | os.PathLike) -> str | None:
    """The hub id (`ORG/NAME`) of a snapshot directory in a hub cache, else None: what an export should name
    as its base model so it loads on another machine, instead of this machine's cache path."""
    m = _SNAPSHOT.search(Path(directory).resolve().as_posix())
    return m.group(2).replace("--", "/", 1) if m else None


def portable_ref(path: str | os.PathLike) -> str:
    """How an export names a base model: its hub id when it came from a hub cache, else its absolute path (a
    relative one would break as soon as the export is used from another directory)."""
    return repo_id_of(path) or str(Path(path).resolve())
