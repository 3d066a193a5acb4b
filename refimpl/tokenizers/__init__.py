"""Tokenizers for Llama 2, Open-Llama and OPT that give the same ids and text as transformers 4.46.3.

    tok = load_tokenizer("path/to/checkpoint")
    ids = tok.encode("Hello world")            # with bos (and eos if the config says so)
    text = tok.decode(ids, skip_special_tokens=True)
    batch = tok(["a", "b c"], padding=True)    # {"input_ids", "attention_mask"}: int64 arrays
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # chat.py; needs jinja2

Llama / Open-Llama: the slow LlamaTokenizer, backed by sentencepiece (imported only then). Without
sentencepiece, tokenizer.json is read in pure Python instead, which reproduces LlamaTokenizerFast.
OPT: GPT2Tokenizer's byte-level BPE, in Python, from vocab.json + merges.txt (or tokenizer.json).
Importing this package needs numpy and the standard library only. See docs/tokenizers.md.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .added_tokens import SPECIAL_TOKEN_NAMES, check_special_token
from .base import Tokenizer, check_text
from .chat import read_chat_template
from .errors import (
    ChatTemplateError,
    InputTypeError,
    InvalidTextError,
    InvalidTokenIdError,
    StreamDecodeError,
    TokenizerFileError,
    TokenizerUsageError,
    UnsupportedTokenizerError,
)
from .files import expect, read_json, summary
from .gpt2_bpe import GPT2Tokenizer, read_merges, read_vocab
from .streaming import StreamDecoder
from .tokenizer_json import LlamaJsonTokenizer, read_gpt2_tokenizer_json

__all__ = [
    "load_tokenizer",
    "Tokenizer",
    "GPT2Tokenizer",
    "LlamaJsonTokenizer",
    "StreamDecoder",
    "TokenizerFileError",
    "UnsupportedTokenizerError",
    "InvalidTokenIdError",
    "StreamDecodeError",
    "InvalidTextError",
    "InputTypeError",
    "TokenizerUsageError",
    "ChatTemplateError",
    "check_text",
]

# tokenizer_config.json's tokenizer_class -> family. The Fast variants name the same tokenizer.
CLASSES = {
    "LlamaTokenizer": "llama",
    "LlamaTokenizerFast": "llama",
    "GPT2Tokenizer": "gpt2",
    "GPT2TokenizerFast": "gpt2",
}
# config.json's model_type -> family, for folders whose tokenizer_config.json names no class (facebook/opt-*).
MODEL_TYPES = {"llama": "llama", "open-llama": "llama", "open_llama": "llama", "opt": "gpt2", "gpt2": "gpt2"}
# What load_tokenizer accepts as keyword overrides (like from_pretrained's kwargs).
OVERRIDES = {
    "legacy", "add_bos_token", "add_eos_token", "add_prefix_space", "padding_side", "clean_up_tokenization_spaces",
    "bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens", "chat_template",
}
# The tokenizer_config.json fields we read that are not tokens, with the JSON types each may have. null means
# "not set" where transformers takes it so (a null add_bos_token is falsy there too). Tokens (bos_token, ...,
# additional_special_tokens) are checked by check_special_token.
NULL = type(None)
SETTING_TYPES = {
    "tokenizer_class": (str, NULL), "legacy": (bool, NULL), "add_bos_token": (bool, NULL),
    "add_eos_token": (bool, NULL), "add_prefix_space": (bool, NULL), "clean_up_tokenization_spaces": (bool, NULL),
    "padding_side": (str,), "errors": (str,), "sp_model_kwargs": (dict, NULL), "added_tokens_decoder": (dict,),
}


def load_tokenizer(path, **overrides) -> Tokenizer:
    """The tokenizer in a Hugging Face checkpoint folder. Keyword overrides replace tokenizer_config.json values,
    e.g. load_tokenizer(path, legacy=False) or load_tokenizer(path, pad_token="<unk>")."""
    folder = Path(path)
    if not folder.is_dir():
        raise TokenizerFileError(f"{folder}: not a directory (give the checkpoint folder with the tokenizer files)")
    unknown = set(overrides) - OVERRIDES
    if unknown:
        raise InputTypeError(f"load_tokenizer() got unknown keyword arguments {sorted(unknown)}; "
                             f"known: {sorted(OVERRIDES)}")
    config_file = folder / "tokenizer_config.json"
    config = check_settings(read_json(config_file), config_file) if config_file.is_file() else {}
    try:
        check_settings(overrides, "load_tokenizer()")
    except TokenizerFileError as e:
        raise TokenizerUsageError(str(e)) from None
    family = _family(folder, config)
    tokenizer = _load_llama(folder, config, overrides) if family == "llama" else _load_gpt2(folder, config, overrides)
    # None, a template, or {name: template} (the config's list of named templates); checked by check_settings
    tokenizer.chat_template = read_chat_template(overrides.get("chat_template", config.get("chat_template")),
                                                 config_file)
    return tokenizer


def check_settings(settings: dict, where) -> dict:
    """settings (tokenizer_config.json or keyword overrides), if each field we read has a type transformers takes;
    else a TokenizerFileError naming where, the field and the value."""
    for name, value in settings.items():
        if name in SETTING_TYPES:
            expect(value, SETTING_TYPES[name], where, name)
        elif name in (*SPECIAL_TOKEN_NAMES, "additional_special_tokens"):
            check_special_token(name, value, where)
        elif name == "chat_template":
            read_chat_template(value, where)
    side = settings.get("padding_side", "right")
    if side not in ("left", "right"):
        raise TokenizerFileError(f"{where}: padding_side must be 'left' or 'right', got {summary(side)}")
    return settings


def _family(folder: Path, config: dict) -> str:
    """Llama or GPT-2 style: from tokenizer_class, else config.json's model_type, else the files present."""
    name = config.get("tokenizer_class")
    if name is not None:
        if name not in CLASSES:
            raise UnsupportedTokenizerError(
                f"{folder / 'tokenizer_config.json'}: tokenizer_class {summary(name)} is not supported; "
                f"supported: {sorted(CLASSES)}"
            )
        return CLASSES[name]
    model_type = _model_type(folder)
    if model_type is not None:
        if model_type not in MODEL_TYPES:
            raise UnsupportedTokenizerError(
                f"{folder / 'config.json'}: model_type {summary(model_type)}: no tokenizer for it"
            )
        return MODEL_TYPES[model_type]
    if (folder / "tokenizer.model").is_file():
        return "llama"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return "gpt2"
    if (folder / "tokenizer.json").is_file():
        data = read_json(folder / "tokenizer.json")
        model, pre = data.get("model"), data.get("pre_tokenizer")
        if isinstance(model, dict) and model.get("type") == "BPE" and model.get("byte_fallback"):
            return "llama"
        if isinstance(pre, dict) and pre.get("type") == "ByteLevel":
            return "gpt2"
        raise UnsupportedTokenizerError(f"{folder / 'tokenizer.json'}: neither a Llama nor a GPT-2 style tokenizer")
    raise TokenizerFileError(
        f"{folder}: no tokenizer files (tokenizer.model, tokenizer.json, or vocab.json + merges.txt)"
    )


def _model_type(folder: Path) -> str | None:
    try:
        with open(folder / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None  # config.json only helps to guess; the files present decide otherwise
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None


def _load_llama(folder: Path, config: dict, overrides: dict) -> Tokenizer:
    has_model, has_json = (folder / "tokenizer.model").is_file(), (folder / "tokenizer.json").is_file()
    if has_model and _sentencepiece_installed():
        from .llama import LlamaTokenizer

        return LlamaTokenizer(folder, config, overrides)
    if has_json:
        if "legacy" in overrides:
            raise UnsupportedTokenizerError(
                f"{folder}: legacy= cannot be changed without sentencepiece: tokenizer.json fixes the behaviour"
            )
        warnings.warn(
            f"sentencepiece is not installed (or there is no tokenizer.model): reading {folder / 'tokenizer.json'} "
            "in pure Python. This reproduces LlamaTokenizerFast, whose decode spacing (and, for legacy=False, "
            "encoding of leading spaces) differs from the slow LlamaTokenizer; see docs/tokenizers.md.",
            stacklevel=3,
        )
        return LlamaJsonTokenizer(folder, config, overrides)
    if has_model:
        raise TokenizerFileError(
            f"{folder / 'tokenizer.model'} needs the sentencepiece package (pip install sentencepiece), "
            "and there is no tokenizer.json to fall back on"
        )
    raise TokenizerFileError(f"{folder}: a Llama tokenizer needs tokenizer.model or tokenizer.json; neither is there")


def _load_gpt2(folder: Path, config: dict, overrides: dict) -> Tokenizer:
    if (folder / "vocab.json").is_file() or (folder / "merges.txt").is_file():
        vocab, merges = read_vocab(folder / "vocab.json"), read_merges(folder / "merges.txt")
    elif (folder / "tokenizer.json").is_file():
        vocab, merges, add_prefix_space = read_gpt2_tokenizer_json(folder / "tokenizer.json")
        config = {"add_prefix_space": add_prefix_space, **config}
    else:
        raise TokenizerFileError(f"{folder}: an OPT/GPT-2 tokenizer needs vocab.json and merges.txt, or tokenizer.json")
    return GPT2Tokenizer(vocab, merges, folder, config, overrides)


def _sentencepiece_installed() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True
