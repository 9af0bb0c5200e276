"""The one place unimodal talks to the Hugging Face Hub (tests fake only ``HfApi``'s network calls)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

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


class PushToHubMixin:
    """``push_to_hub`` for any class with ``save_pretrained(dir)``: save to a temporary folder, then
    upload it as one commit."""

    hub_commit_message = "Upload with unimodal"

    if TYPE_CHECKING:  # what the class using the mixin provides

        def save_pretrained(self, save_directory: str | os.PathLike, /) -> object: ...

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ):
        """Create ``repo_id`` if needed and upload the `save_pretrained` folder; returns the commit."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder_to_hub(tmp, repo_id, private=private, token=token, revision=revision,
                                      commit_message=commit_message or self.hub_commit_message)

    def write_config_and_push(self, folder: Path, name: str, config: dict, push_to_hub: bool, kwargs: dict) -> None:
        """The end of a ``save_pretrained(folder, push_to_hub, **kwargs)``: write ``config`` as JSON to
        ``folder/name``; with ``push_to_hub`` upload the folder (``kwargs``: ``repo_id``, default the
        folder name, and `push_folder_to_hub` arguments)."""
        (folder / name).write_text(json.dumps(config, indent=2) + "\n")
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", folder.name)
            kwargs.setdefault("commit_message", self.hub_commit_message)
            push_folder_to_hub(folder, repo_id, **kwargs)
