"""Model arguments checked before any work: a folder that exists, or a Hub id that can be reached (or is cached).

A mistyped folder or an unreachable Hub id fails in well under a second with one line naming the argument, instead
of transformers' own errors after its network retries. Offline (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`) or with
the Hub unreachable, a Hub id found in the local Hugging Face cache resolves to its cached snapshot folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HUB_TIMEOUT = 5.0  # seconds for the one look-up of a Hub id (no retries)
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """True when the environment asks for no Hub traffic (huggingface_hub's and transformers' variables)."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(text: str) -> bool:
    """True when `text` can only mean a local path: absolute or relative (`.`, `~`), a Windows separator, more than
    one `/`, an existing file, or a first component that exists here (a typo inside a local folder)."""
    if text.startswith((".", "~", "/")) or "\\" in text or os.sep != "/" and os.sep in text or text.count("/") > 1:
        return True
    path = Path(text)
    return path.exists() or (len(path.parts) > 1 and Path(path.parts[0]).exists())


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of `repo_id` in the Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001  (not cached, or a cache it cannot read: either way not usable)
        return None


def local_folder(text: str, flag: str = "") -> Path:
    """`text` as an existing folder; ValueError naming it otherwise (for arguments that must be local)."""
    path = Path(text).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "no such folder"
        raise ValueError(f"{flag}{text}: {what}")
    return path


def resolve_model(text: str, flag: str = "") -> str:
    """What `from_pretrained` should be given for the model argument `text` (`flag`: its option, for messages).

    A folder is returned as given; a path-like argument that is not a folder, a malformed Hub id, a Hub id that does
    not exist, or an uncached Hub id while offline or unreachable raise ValueError with one line. A cached Hub id
    returns its snapshot folder when the Hub must not or cannot be asked."""
    if Path(text).expanduser().is_dir():
        return text
    if looks_like_path(text):
        local_folder(text, flag)
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise ValueError(f"{flag}{text}: no such folder, and not a Hub model id (like org/name)") from None
    cached = _cached_snapshot(text)
    if hub_offline():
        if cached is None:
            raise ValueError(
                f"{flag}{text}: no such folder, and not in the Hugging Face cache (offline: HF_HUB_OFFLINE is set)"
            )
        return cached
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(text, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        raise ValueError(f"{flag}{text}: a gated Hub model; accept its terms and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{flag}{text}: no such folder, and no such model on the Hub (or it is private)") from None
    except Exception as err:  # noqa: BLE001  (connection refused, DNS, timeout, server error: the Hub is unreachable)
        reason = " ".join(str(err).split()) or type(err).__name__
        if cached is None:
            raise ValueError(f"{flag}{text}: no such folder, and the Hub is unreachable ({reason})") from None
        print(f"The Hub is unreachable ({reason}): using the cached {text} at {cached}", file=sys.stderr)
        return cached
    return text
