"""Byte-level BPE tokenizers: `smedjan tokenizer` trains one, `Tokenizer` uses any HF tokenizer folder.

A trained folder holds exactly what `transformers.AutoTokenizer.from_pretrained` reads:

* ``tokenizer.json``  -- the `tokenizers` model; its post-processor prepends ``<|bos|>``, so
  ``AutoTokenizer(text)`` and ``Tokenizer.encode(text, add_bos=True)`` give the same ids;
* ``tokenizer_config.json`` -- special tokens, ``PreTrainedTokenizerFast`` class and the chat template;
* ``special_tokens_map.json`` and ``chat_template.jinja``.

Special tokens take the first ids: ``<|pad|>``=0, ``<|bos|>``=1, ``<|eos|>``=2, ``<|unk|>``=3,
``<|im_start|>``=4, ``<|im_end|>``=5 (bos/eos match `ModelConfig`'s defaults).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from smedjan.errors import UserError
from smedjan.text import DataError, count_input_bytes, expand_inputs, iter_documents

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IM_START, IM_END]
BYTE_ALPHABET = 256
TOKENIZER_FILES_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# ChatML, with bos first (tokenising the rendered text must not add a second one).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TokenizerError(UserError, ValueError):
    """Bad tokenizer input or folder. `reason`: the message without the file it names."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- using a tokenizer -----------------------------------------------------------------------------
class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` for any HF folder that holds a tokenizer.json.

    encode/decode never add or strip anything silently: `encode(text)` gives the raw ids and
    `add_bos=True` prepends bos (what transformers does for a folder written by `train_tokenizer`).
    """

    def __init__(self, tk, config: dict | None = None, path: Path | None = None):
        self._tk = tk
        self.config = config or {}
        self.path = path
        self.bos_token = _token_str(self.config.get("bos_token")) or (BOS if tk.token_to_id(BOS) is not None else None)
        self.eos_token = _token_str(self.config.get("eos_token")) or (EOS if tk.token_to_id(EOS) is not None else None)
        self.pad_token = _token_str(self.config.get("pad_token"))
        self.bos_id = tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = tk.token_to_id(self.eos_token) if self.eos_token else None
        self.pad_id = tk.token_to_id(self.pad_token) if self.pad_token else None
        self.chat_template = self.config.get("chat_template")
        self._template_source = f"{path / 'tokenizer_config.json'}: chat_template" if path else "chat_template"
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        if self.chat_template is None and path is not None and (path / "chat_template.jinja").is_file():
            self.chat_template = (path / "chat_template.jinja").read_text(errors="replace")
            self._template_source = str(path / "chat_template.jinja")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise TokenizerError(f"{self._template_source}: expected a template string, got {self.chat_template!r}")
        self._compiled_template = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as TK

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json (train one with `smedjan tokenizer`)")
        try:
            tk = TK.from_file(str(tj))
        except Exception as e:
            raise TokenizerError(f"{tj}: not a valid tokenizers file: {e}") from None
        config = {}
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except (ValueError, OSError) as e:  # JSON, UTF-8
                raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
            for key in ("bos_token", "eos_token", "pad_token"):
                if not isinstance(_token_str(config.get(key)), (str, type(None))):
                    raise TokenizerError(f"{cfg_path}: {key} must be a string, got {config[key]!r}")
        return cls(tk, config, path)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the smallest valid model vocab)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters: no token stands for more text than that (a
        byte-level entry has one character per byte), which bounds a text's token count from below."""
        return max(len(t) for t in self._tk.get_vocab(with_added_tokens=True))

    @property
    def hash(self) -> str | None:
        return file_sha256(self.path / "tokenizer.json") if self.path else None

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: eos and, for chat, <|im_end|>."""
        ids = [self.eos_id, self._tk.token_to_id(IM_END)]
        return sorted({i for i in ids if i is not None})

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """The ids `AutoTokenizer` gives for `text` from this folder: its post-processor decides whether a
        BOS (or anything else) is added. A GPT-2-style tokenizer has a bos token but no BOS rule: its
        prompts start with the text's own tokens."""
        return self._tk.encode(text, add_special_tokens=True).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, (start, end) character span of each token in `text`), as `encode(text)`."""
        enc = self._tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def compile_chat_template(self):
        """The compiled template; a TokenizerError naming the file if it does not parse (so a server
        can refuse a broken one at startup rather than at every chat request)."""
        if self._compiled_template is None:
            try:
                self._compiled_template = _compile_template(self.chat_template or DEFAULT_CHAT_TEMPLATE)
            except Exception as e:
                raise self._template_error(e) from None
        return self._compiled_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` with the folder's jinja template, the way transformers does.

        The template is code from the folder, run sandboxed: whatever it raises (a syntax error, a
        blocked attribute, its own raise_exception) is a TokenizerError naming where it came from."""
        template = self.compile_chat_template()
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                pad_token=self.pad_token or "",
                **kwargs,
            )
        except Exception as e:
            raise self._template_error(e) from None

    def _template_error(self, e: Exception) -> TokenizerError:
        where = self._template_source if self.chat_template else "the default chat template"
        reason = f"the chat template failed: {type(e).__name__}: {e}"
        return TokenizerError(f"{where}: {reason}", reason)


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialisation
        return tok.get("content")
    return tok


def _compile_template(source: str):
    """Same environment as transformers' chat templates (trim_blocks, lstrip_blocks, raise_exception)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


# ---- training a tokenizer --------------------------------------------------------------------------
def train_tokenizer(
    inputs: list[str],
    output: str | os.PathLike,
    vocab_size: int = 8192,
    *,
    text_field: str = "text",
    min_frequency: int = 2,
    split: str = "auto",
    progress: bool = True,
) -> Path:
    """Train byte-level BPE on text/jsonl(.gz) inputs and write a HF tokenizer folder."""
    from tokenizers import Tokenizer as TK
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    paths = expand_inputs(inputs)
    minimum = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is below the byte alphabet plus special tokens "
            f"({BYTE_ALPHABET} + {len(SPECIAL_TOKENS)} = {minimum})"
        )

    total = count_input_bytes(paths)
    bar = _progress(total, "reading", progress)
    n_docs = 0

    def batches():
        nonlocal n_docs
        batch, size = [], 0
        for doc in iter_documents(paths, text_field=text_field, split=split):
            n_docs += 1
            batch.append(doc)
            size += len(doc)
            if size >= 1 << 20:
                bar.update(size)
                yield batch
                batch, size = [], 0
        if batch:
            bar.update(size)
            yield batch

    tk = TK(models.BPE(unk_token=None, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tk.train_from_iterator(batches(), trainer=trainer)
    bar.close()
    if n_docs == 0:
        raise TokenizerError(f"no text found in {', '.join(map(str, paths))}")
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tk.save(str(output / "tokenizer.json"))
    write_tokenizer_config(output, model_max_length=None)
    return output


def write_tokenizer_config(folder: Path, model_max_length: int | None = None) -> None:
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000_000,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**special, "additional_special_tokens": [IM_START, IM_END]}, indent=2) + "\n"
    )
    (folder / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, dynamic_ncols=True)


# ---- CLI ---------------------------------------------------------------------------------------------
def run(args) -> int:

    try:
        out = train_tokenizer(
            args.input,
            args.output,
            args.vocab_size,
            text_field=args.text_field,
            min_frequency=args.min_frequency,
            split=args.split,
        )
    except (TokenizerError, DataError) as e:
        raise UserError(str(e)) from None
    tok = Tokenizer.from_dir(out)
    print(f"wrote {out}/tokenizer.json: vocab {tok.vocab_size}, sha256 {tok.hash[:16]}…")
    return 0


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (HF-compatible folder)")
    p.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files (or .gz of them), globs allowed")
    p.add_argument("--output", required=True, help="folder to write tokenizer.json & co. into")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument(
        "--split",
        choices=["auto", "line", "blank", "file"],
        default="auto",
        help="document boundaries in .txt: lines, blank lines, whole file (auto: blank lines if any)",
    )
    p.set_defaults(func=run)
