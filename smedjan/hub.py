"""Hub push/pull through huggingface_hub, with a model card written from the checkpoint."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from smedjan.checkpoint import CheckpointError, load_config
from smedjan.config import human
from smedjan.errors import UserError

CARD_TEMPLATE = resources.files("smedjan") / "cards" / "model_card.md"  # shipped inside the package


def render_model_card(folder: str | Path, repo_id: str, license: str = "apache-2.0") -> str:
    """README.md text for a checkpoint folder; training details come from run metadata when present."""
    folder = Path(folder)
    cfg = load_config(folder)
    training = "Not recorded."
    meta = folder / "smedjan_run.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        training = "\n".join(f"- {k}: {v}" for k, v in info.items())
    rope = cfg.rope_type if cfg.rope_type != "default" else "plain"
    return CARD_TEMPLATE.read_text().format(
        license=license,
        name=repo_id.split("/")[-1],
        repo_id=repo_id,
        model_type=cfg.model_type,
        params=human(cfg.num_params()),
        rope=f"{rope}, theta {cfg.rope_theta:g}",
        training=training,
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


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    license: str = "apache-2.0",
    token: str | None = None,
    api=None,
) -> str:
    """Create the repo if needed and upload the folder with a generated model card; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    load_config(folder)  # refuse to upload something smedjan itself could not load
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: no *.safetensors files to push")
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    card = folder / "README.md"
    if not card.exists():
        card.write_text(render_model_card(folder, repo_id, license))
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message="Upload model trained with smedjan",
        ignore_patterns=["*.tmp-save*", "*.old-save*"],
    )
    return str(info)


def pull(repo_id: str, output: str | Path | None = None, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        repo_id,
        revision=revision,
        local_dir=output,
        allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "README.md"],
    )
    return Path(path)


def register(sub) -> None:

    def run_push(args):
        try:
            print(push(args.folder, args.repo_id, private=args.private, license=args.license))
        except CheckpointError as e:
            raise UserError(str(e)) from None

    def run_pull(args):
        try:
            print(pull(args.repo_id, args.output, args.revision))
        except Exception as e:  # offline, missing repo, auth: report, don't trace
            raise UserError(f"could not pull {args.repo_id!r}: {e}") from None

    p = sub.add_parser("push", help="upload a checkpoint folder to the Hugging Face Hub with a model card")
    p.add_argument("folder")
    p.add_argument("repo_id", help="owner/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--license", default="apache-2.0")
    p.set_defaults(func=run_push)

    p = sub.add_parser("pull", help="download a checkpoint from the Hub (honours HF_HUB_OFFLINE and the cache)")
    p.add_argument("repo_id")
    p.add_argument("--output", help="folder to place the files in (default: the hub cache)")
    p.add_argument("--revision")
    p.set_defaults(func=run_pull)
