"""Hub push/pull through huggingface_hub, with a model card written from the checkpoint."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from smedjan.checkpoint import CheckpointError, load_config
from smedjan.config import human
from smedjan.errors import UserError

CARD_TEMPLATE = resources.files("smedjan") / "cards" / "model_card.md"  # shipped inside the package


TRAINING_LABELS = {
    "data": "data",
    "objective": "objective",
    "step": "steps trained",
    "tokens_seen": "tokens seen",
    "batch_size": "batch size (sequences)",
    "seq_len": "sequence length",
    "train_loss": "final train loss",
    "val_loss": "validation loss",
    "val_perplexity": "validation perplexity",
    "wall_s": "training time (s)",
}
PULL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "README.md", "*.gguf", "onnx/*"]
IGNORED = ("*.tmp-save*", "*.old-save*", "*.tmp", ".*")


class HubError(UserError):
    """The hub could not be reached or refused a request."""


def _training_section(info: dict) -> str:
    rows = [f"| {label} | {info[k]} |" for k, label in TRAINING_LABELS.items() if info.get(k) is not None]
    extra = {k: v for k, v in info.items() if k not in TRAINING_LABELS}
    rows += [f"| {k} | `{json.dumps(v) if isinstance(v, dict | list) else v}` |" for k, v in extra.items()]
    return "| | |\n|---|---|\n" + "\n".join(rows) if rows else "Not recorded."


def _files_section(folder: Path) -> str:
    """The other runtimes' files the folder carries, so a reader of the card knows what is there."""
    lines = []
    for f in sorted(folder.glob("*.gguf")):
        lines.append(f"- `{f.name}`: GGUF for llama.cpp (`llama-cli -m {f.name}`)")
    if (folder / "onnx" / "model.onnx").is_file():
        lines.append("- `onnx/model.onnx`: ONNX decoder with KV cache (onnxruntime, transformers.js)")
    if (folder / "adapter_config.json").is_file():
        lines.append("- `adapter_config.json` + `adapter_model.safetensors`: a PEFT LoRA adapter")
    return "\n".join(lines) or "Safetensors weights, config and tokenizer only."


def render_model_card(folder: str | Path, repo_id: str, license: str = "apache-2.0") -> str:
    """README.md text for a checkpoint folder; the Training section comes from its smedjan_run.json."""
    folder = Path(folder)
    cfg = load_config(folder)
    training = "Not recorded."
    meta = folder / "smedjan_run.json"
    if meta.is_file():
        try:
            training = _training_section(json.loads(meta.read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{meta}: not valid JSON ({e})") from None
    rope = cfg.rope_type if cfg.rope_type != "default" else "plain"
    return CARD_TEMPLATE.read_text().format(
        license=license,
        name=repo_id.split("/")[-1],
        repo_id=repo_id,
        model_type=cfg.model_type,
        params=human(cfg.num_params()),
        rope=f"{rope}, theta {cfg.rope_theta:g}",
        training=training,
        files=_files_section(folder),
        **{
            k: getattr(cfg, k)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "intermediate_size",
                "vocab_size",
                "max_position_embeddings",
                "tie_word_embeddings",
            )
        },
    )


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_error(action: str, endpoint: str, e: Exception) -> HubError:
    """One line for the ways a hub call fails: offline mode, no connection, an HTTP refusal."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return HubError(f"{action}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach {endpoint}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        server = (getattr(e, "server_message", None) or str(e).splitlines()[0]).strip()
        return HubError(f"{action}: {endpoint} answered {status}: {server}")
    return HubError(
        f"{action}: could not reach {endpoint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    )


def _files_to_upload(folder: Path) -> list[Path]:
    files = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if f.is_file() and not any(rel.match(p) or any(part.startswith(".") for part in rel.parts) for p in IGNORED):
            files.append(f)
    return files


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    license: str = "apache-2.0",
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload model trained with smedjan",
) -> str:
    """Upload a checkpoint folder (model, tokenizer, and any GGUF/ONNX/adapter files in it) with a
    model card, creating the repo if needed; returns the commit URL.

    Nothing is sent before the card renders and the folder checks out. Each file is announced to the
    hub on its own (the preupload call), so a refusal names the file; then one commit carries them all.
    The folder itself is not modified (the card is uploaded as README.md unless the folder has one).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    folder = Path(folder)
    load_config(folder)  # refuse to upload something smedjan itself could not load
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: no *.safetensors files to push")
    if repo_id.count("/") != 1:
        raise HubError(f"repo id {repo_id!r}: expected owner/name")
    card = None if (folder / "README.md").is_file() else render_model_card(folder, repo_id, license).encode()
    url = _endpoint(endpoint)
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"push: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach {url}")
    ops = [CommitOperationAdd(str(f.relative_to(folder).as_posix()), str(f)) for f in _files_to_upload(folder)]
    if card is not None:
        ops.append(CommitOperationAdd("README.md", card))
    api = HfApi(endpoint=url, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as e:
        raise _hub_error(f"creating {repo_id}", url, e) from None
    for op in ops:
        try:
            api.preupload_lfs_files(repo_id, additions=[op], repo_type="model")
        except Exception as e:
            raise _hub_error(f"uploading {op.path_in_repo}", url, e) from None
    try:
        info = api.create_commit(repo_id, operations=ops, commit_message=commit_message, repo_type="model")
    except Exception as e:
        raise _hub_error(f"committing {len(ops)} files to {repo_id}", url, e) from None
    return str(info.commit_url)


def pull(
    repo_id: str, output: str | Path | None = None, revision: str | None = None, endpoint: str | None = None
) -> Path:
    """Download a checkpoint (weights, config, tokenizer, card, GGUF/ONNX files) from the hub."""
    from huggingface_hub import snapshot_download

    url = _endpoint(endpoint)
    try:
        path = snapshot_download(
            repo_id, revision=revision, local_dir=output, allow_patterns=PULL_PATTERNS, endpoint=url
        )
    except Exception as e:  # offline with nothing cached, no such repo, auth
        raise _hub_error(f"could not pull {repo_id!r}", url, e) from None
    return Path(path)


ENDPOINT_HELP = "hub address (default: $HF_ENDPOINT, else https://huggingface.co); HF_TOKEN or `hf auth login` for auth"


def register(sub) -> None:
    def run_push(args):
        try:
            print(push(args.folder, args.repo_id, private=args.private, license=args.license, endpoint=args.endpoint))
        except CheckpointError as e:
            raise UserError(str(e)) from None

    def run_pull(args):
        print(pull(args.repo_id, args.output, args.revision, endpoint=args.endpoint))

    p = sub.add_parser("push", help="upload a checkpoint folder to the Hugging Face Hub with a model card")
    p.add_argument("folder")
    p.add_argument("repo_id", help="owner/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--endpoint", help=ENDPOINT_HELP)
    p.set_defaults(func=run_push)

    p = sub.add_parser("pull", help="download a checkpoint from the Hub (honours HF_HUB_OFFLINE and the cache)")
    p.add_argument("repo_id")
    p.add_argument("--output", help="folder to place the files in (default: the hub cache)")
    p.add_argument("--revision")
    p.add_argument("--endpoint", help=ENDPOINT_HELP)
    p.set_defaults(func=run_pull)
