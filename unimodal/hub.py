"""The one place unimodal talks to the Hugging Face Hub (tests fake only ``HfApi``'s network calls)."""

from __future__ import annotations

import os

from huggingface_hub import HfApi


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload with unimodal",
):
    """Create ``repo_id`` if needed and upload ``folder`` as one commit; returns the commit info."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message
    )
