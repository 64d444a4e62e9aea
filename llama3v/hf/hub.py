"""Checkpoints by Hugging Face Hub id: `llama3v convert org/name` resolves the id to a local snapshot.

huggingface_hub does the work (its cache, token, `HF_HUB_OFFLINE`, `HF_HOME`); only the files the
converter reads are fetched: config, preprocessor and tokenizer files, the chat template and the
weights. Weights come in a second step so that a repository holding both safetensors and `.bin`
copies downloads only the safetensors (what the converter prefers). A local path always wins.
"""

from __future__ import annotations

import re
from pathlib import Path

from llama3v.errors import Llama3vError

# What hf/checkpoint.py, hf/key_formats.py and converters/tokenizer.py read beside the weights.
METADATA_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "chat_template.json")
SAFETENSORS_FILES = ("*.safetensors", "model.safetensors.index.json")
BIN_FILES = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_checkpoint(src: str | Path, revision: str | None = None) -> Path:
    """The checkpoint directory for `src`: the local path when it exists, else the Hub id's snapshot (fetched)."""
    if Path(src).exists():
        if revision is not None:
            raise Llama3vError(f"{src} is a local path; --revision applies to Hugging Face Hub ids")
        return Path(src)
    repo_id = str(src)
    if not _HUB_ID.fullmatch(repo_id):
        raise Llama3vError(f"{src}: no such checkpoint directory (and not a Hub id of the form org/name)")
    root = _snapshot(repo_id, revision, METADATA_FILES + SAFETENSORS_FILES)
    if not any(root.glob("*.safetensors")):
        root = _snapshot(repo_id, revision, METADATA_FILES + BIN_FILES)
    return root


def _snapshot(repo_id: str, revision: str | None, patterns: tuple[str, ...]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns)))
    except GatedRepoError as e:
        raise Llama3vError(f"{what}: a gated model on the Hugging Face Hub; accept its terms on the Hub and log in "
                           "(`hf auth login` or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise Llama3vError(f"{what}: no such local directory, and no such model on the Hugging Face Hub (private "
                           "models need `hf auth login` or HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise Llama3vError(f"{what}: the Hugging Face Hub model has no such revision") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise Llama3vError(f"{what}: no such local directory, and not in the Hugging Face cache "
                           f"{constants.HF_HUB_CACHE} ({why})") from e
    except (HfHubHTTPError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise Llama3vError(f"{what}: download from the Hugging Face Hub failed ({first})") from e
