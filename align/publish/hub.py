"""A finished run's model cards, and its upload to the Hugging Face Hub (--push_to_hub).

    check_push_target(cfg)   # at start, before anything is trained: fails in one line when the upload could not happen
    publish_run(cfg)         # at the end, after summary.json: the cards written, then the upload when asked

The cards (align.publish.model_card) go to output_dir/README.md, output_dir/adapter/README.md and, where the run
merged its adapter, output_dir/merged/README.md, replacing what TRL and PEFT wrote there. The upload is the
adapter folder (with its card) plus summary.json and config.yaml, in one commit.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from align.config import arg
from align.errors import AlignError, ConfigError
from align.io import atomic_write_text
from align.log import get_logger
from align.publish.model_card import BaseModel, describe_base, model_card

logger = get_logger(__name__)
HUB_CHECK_TIMEOUT_S = 3.0  # a TCP connection to the Hub; not huggingface_hub's ~20 s of retries


@dataclass
class PublishArgs:
    push_to_hub: str | None = arg(None, "upload the adapter, its model card and summary.json to this Hub repo (user/name) at the "
                                        "end; the Hub and a token are checked before training; none = no upload")


def _offline(env: Mapping[str, str]) -> bool:
    return env.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def hub_problem(repo_id: str, env: Mapping[str, str] = os.environ, timeout_s: float = HUB_CHECK_TIMEOUT_S,
                token: str | None = None) -> str | None:
    """Why an upload to `repo_id` would fail now, or None when it can go ahead: a bad repo id, HF_HUB_OFFLINE,
    no token, or no TCP connection to the Hub endpoint (HF_ENDPOINT) within `timeout_s`. token: None = look it up."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return f"not a Hub repository id ({err}); expected user/name"
    if _offline(env):
        return "the Hub is unreachable: HF_HUB_OFFLINE is set (unset it, or drop --push_to_hub)"
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        return "no Hugging Face token (run `hf auth login`, or set HF_TOKEN)"
    endpoint = urlparse(env.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        return f"the Hub is unreachable: no connection to {host}:{port} within {timeout_s:g} s ({err.strerror or err})"


def check_push_target(cfg: Any) -> None:
    """Refuse to start a run whose --push_to_hub could not upload at the end (before anything is trained)."""
    repo_id = getattr(cfg, "push_to_hub", None)
    if repo_id is None:
        return
    problem = hub_problem(repo_id)
    if problem:
        raise ConfigError(f"--push_to_hub {repo_id}: {problem}; nothing was trained")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise AlignError(f"{path}: not valid JSON ({err}); the model card needs it") from None


def base_of(config: dict[str, Any], adapter_dir: Path) -> BaseModel:
    """The base the adapter in `adapter_dir` names (adapter_config.json), described from the files beside it."""
    adapter_config = _read_json(adapter_dir / "adapter_config.json")
    path = adapter_config.get("base_model_name_or_path") or config.get("model_name_or_path") or "?"
    local = Path(path)
    if local.is_dir():
        path = str(local.resolve())  # the card is read from anywhere; a relative path would point elsewhere
    wheel = _read_json(local / "align_source.json").get("source") if local.is_dir() else None
    sft_run = None
    if local.is_dir() and local.name == "merged":
        parent_info = _read_json(local.parent / "run_info.json")
        if parent_info.get("stage") == "sft":
            from align.config import load_yaml

            sft_base = load_yaml(local.parent / "config.yaml").get("model_name_or_path", "?")
            sft_run = {"dir": str(local.parent.resolve()), "base": str(sft_base)}
    return describe_base(str(config.get("model_name_or_path", path)), path, wheel_source=wheel, sft_run=sft_run)


def write_model_cards(output_dir: str | os.PathLike, published_as: str | None = None) -> list[Path]:
    """Write the run's cards from its config.yaml, run_info.json and summary.json (atomically); returns their paths."""
    from align.config import load_yaml

    out = Path(output_dir)
    config = load_yaml(out / "config.yaml")
    run_info, summary = _read_json(out / "run_info.json"), _read_json(out / "summary.json")
    adapter = out / "adapter"
    if not adapter.is_dir():
        raise AlignError(f"{adapter}: no adapter to describe (the model card is written after the adapter is saved)")
    base = base_of(config, adapter)
    written = []
    adapter_card = model_card(config, run_info, summary, base=base, artifact="adapter", location=str(adapter.resolve()),
                              published_as=published_as)
    for path in (out / "README.md", adapter / "README.md"):
        atomic_write_text(path, adapter_card)
        written.append(path)
    merged = out / "merged"
    if (merged / "config.json").is_file():
        atomic_write_text(merged / "README.md", model_card(config, run_info, summary, base=base, artifact="merged",
                                                           location=str(merged.resolve())))
        written.append(merged / "README.md")
    return written


def push_run(output_dir: str | os.PathLike, repo_id: str) -> str:
    """Upload output_dir/adapter (with its card), summary.json and config.yaml to `repo_id` in one commit; returns its URL.

    The uploaded adapter_config.json names the base's Hub id where it has one: the local path this machine
    loaded it from means nothing elsewhere. One create_commit rather than upload_folder: the files come from two
    folders, and nothing is copied to stage them.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from align.config import load_yaml

    out = Path(output_dir)
    adapter = out / "adapter"
    base = base_of(load_yaml(out / "config.yaml"), adapter)
    operations = []
    for path in sorted(p for p in adapter.rglob("*") if p.is_file()):
        name = path.relative_to(adapter).as_posix()
        content: str | bytes = str(path)
        if name == "adapter_config.json" and base.hub_id:
            adapter_config = json.loads(path.read_text(encoding="utf-8"))
            adapter_config["base_model_name_or_path"] = base.hub_id
            content = (json.dumps(adapter_config, indent=2) + "\n").encode()
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    for name in ("summary.json", "config.yaml"):
        if (out / name).is_file():
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(out / name)))
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    commit = api.create_commit(repo_id, operations=operations, commit_message=f"align: adapter, model card and summary from {out.name}")
    return commit.commit_url


def publish_run(cfg: Any) -> None:
    """The end of a run (main process, after summary.json): the model cards, then the upload when --push_to_hub asks."""
    repo_id = getattr(cfg, "push_to_hub", None)
    cards = write_model_cards(cfg.output_dir, published_as=repo_id)
    logger.info(f"model card: {', '.join(str(p) for p in cards)}")
    if repo_id:
        try:
            url = push_run(cfg.output_dir, repo_id)
        except Exception as err:  # noqa: BLE001 - network, auth, quota: the run itself is complete and kept
            raise AlignError(f"--push_to_hub {repo_id}: the upload failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                             f"the run is complete in {cfg.output_dir}; upload it later with huggingface_hub's upload_folder") from None
        logger.info(f"pushed to the Hub: {url}")
