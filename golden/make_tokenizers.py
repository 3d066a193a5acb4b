"""Train the two small golden tokenizers and record what transformers 4.46.3 does with them.

This is the one script behind golden/tokenizers/. It
  1. trains a sentencepiece BPE model with Llama 2's trainer settings (byte fallback, split digits,
     dummy prefix, identity normalization) and a byte-level BPE with OPT's special-token layout,
     both on golden/tokenizers/train_text.txt, which we wrote for this purpose;
  2. saves them as Hugging Face tokenizer folders with transformers' own save_pretrained;
  3. writes corpus.json (the strings we test on) and, for every tokenizer variant (slow/fast,
     legacy True/False), the ids and decoded text that transformers produces.
It needs the `golden` extra (torch is not needed, but transformers, tokenizers, sentencepiece and
protobuf are). Re-running it rewrites the same bytes: both trainers run single-threaded.

    python golden/make_tokenizers.py
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import sentencepiece as spm
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Tokenizer, GPT2TokenizerFast, LlamaTokenizer, LlamaTokenizerFast

ROOT = Path(__file__).resolve().parent / "tokenizers"
TRAIN_TEXT = ROOT / "train_text.txt"
EXPECTED = ROOT / "expected"

SP_VOCAB_SIZE = 1500
BPE_VOCAB_SIZE = 2000
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, 3 as in facebook/opt-*

# Folder -> how it is built. "llama-extra" adds tokens so that added-token quirks get tested.
LLAMA_FOLDERS = {
    "llama": dict(legacy=True),
    "llama-nonlegacy": dict(legacy=False),
    "llama-extra": dict(legacy=True, add_eos_token=True, pad_token="<pad>", additional_special_tokens=["<sep>"]),
}
# Variant name -> (transformers class, folder).
VARIANTS = {
    "llama_slow_legacy": (LlamaTokenizer, "llama"),
    "llama_fast_legacy": (LlamaTokenizerFast, "llama"),
    "llama_slow_nonlegacy": (LlamaTokenizer, "llama-nonlegacy"),
    "llama_fast_nonlegacy": (LlamaTokenizerFast, "llama-nonlegacy"),
    "llama_extra_slow": (LlamaTokenizer, "llama-extra"),
    "llama_extra_fast": (LlamaTokenizerFast, "llama-extra"),
    "opt_slow": (GPT2Tokenizer, "opt"),
    "opt_fast": (GPT2TokenizerFast, "opt"),
}
BATCH_TEXTS = ["Hello world", "", "A longer sentence, with   spaces and 中文 😀.", " x</s>y", "<s>\n"]


# ---------------------------------------------------------------------------------------------------------------
# 1. Training
# ---------------------------------------------------------------------------------------------------------------
def training_lines() -> list[str]:
    """The training text without its comment header and without empty lines (sentencepiece reads lines)."""
    text = TRAIN_TEXT.read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line.strip() and not line.startswith("# ")]


def train_sentencepiece() -> bytes:
    """A sentencepiece BPE model with the trainer settings stored in Llama 2's tokenizer.model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=SP_VOCAB_SIZE,
        character_coverage=0.99995,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=4192,
        num_threads=1,  # determinism
        minloglevel=2,
    )
    return model.getvalue()


def train_byte_bpe(out_dir: Path) -> None:
    """A GPT-2 style byte-level BPE with OPT's special tokens at ids 0..3; writes vocab.json and merges.txt."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=OPT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TRAIN_TEXT.read_text(encoding="utf-8")], trainer)
    tokenizer.model.save(str(out_dir))


# ---------------------------------------------------------------------------------------------------------------
# 2. Hugging Face folders
# ---------------------------------------------------------------------------------------------------------------
def save_fast_tokenizer_json(fast_class, folder: Path) -> None:
    """Convert the saved slow tokenizer to a fast one and keep only its tokenizer.json in the folder."""
    fast = fast_class.from_pretrained(str(folder))
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "tokenizer.json", folder / "tokenizer.json")


def make_llama_folders(model: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "tokenizer.model"
        model_file.write_bytes(model)
        for name, kwargs in LLAMA_FOLDERS.items():
            folder = ROOT / name
            shutil.rmtree(folder, ignore_errors=True)
            tok = LlamaTokenizer(str(model_file), **kwargs)
            if name == "llama-extra":
                tok.add_tokens(["<extra>"])  # a non-special added token: spaces_between_special_tokens applies to it
            tok.save_pretrained(str(folder))
            save_fast_tokenizer_json(LlamaTokenizerFast, folder)


def make_opt_folder() -> None:
    folder = ROOT / "opt"
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_byte_bpe(Path(tmp))
        tok = GPT2Tokenizer(
            str(Path(tmp) / "vocab.json"),
            str(Path(tmp) / "merges.txt"),
            errors="replace",
            bos_token="</s>",  # facebook/opt-*: bos = eos = unk = "</s>" (id 2), pad = "<pad>" (id 1)
            eos_token="</s>",
            unk_token="</s>",
            pad_token="<pad>",
            add_prefix_space=False,
            add_bos_token=True,
        )
        tok.save_pretrained(str(folder))
    save_fast_tokenizer_json(GPT2TokenizerFast, folder)


# ---------------------------------------------------------------------------------------------------------------
# 3. The corpus
# ---------------------------------------------------------------------------------------------------------------
def build_corpus() -> list[tuple[str, str]]:
    """(category, text) pairs. Everything is written here by hand, plus seeded random mixtures."""
    c: list[tuple[str, str]] = []

    def add(category, *texts):
        c.extend((category, t) for t in texts)

    add(
        "english",
        "Hello world",
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "A tokenizer cuts text into pieces.",
        "Byte pair encoding merges the most frequent pair.",
        "It was the best of times, it was the worst of times.",
        "Call me Ishmael.",
        "To be, or not to be: that is the question.",
        "All happy families are alike; each unhappy family is unhappy in its own way.",
        "The model predicts the next token from the tokens before it.",
        "Supercalifragilisticexpialidocious is a long word.",
        "Antidisestablishmentarianism",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "HELLO WORLD",
        "hello world",
        "HeLLo WoRLd",
        "iPhone eBay McDonald JavaScript PyTorch NumPy",
        "Mr. Smith went to Washington.",
        "e.g. i.e. etc. vs. cf.",
        "The café served crème brûlée.",
        "naïve résumé façade jalapeño Zürich",
        "Weather report: cloudy in the morning, with a chance of rain.",
        "She said, \"I'll be there at eight.\"",
        "Questions? Answers! Exclamations!!! Ellipses...",
        "semi;colons:and,commas",
        "hyphen-ated and em—dash and en–dash",
        "(parentheses) [brackets] {braces} <angles>",
        "quotes 'single' \"double\" `backtick` «guillemets» „low“",
        "The end.",
        "a",
        "I",
        "ab",
        "word",
        "Words",
        "x y z",
        "The lighthouse keeper climbed the stairs every evening at dusk.",
        "Programming languages are written by people for people.",
        "If you are reading this, the tokenizer worked.",
        "Testing means comparing against the real thing.",
    )
    add(
        "chinese",
        "你好，世界！",
        "人工智能是计算机科学的一个分支。",
        "语言模型是一种概率模型。",
        "今天天气很好，阳光明媚。",
        "北京是中国的首都。",
        "我喜欢读书。",
        "中文",
        "中",
        "分词器是语言模型的第一步。",
        "《红楼梦》是中国古典四大名著之一。",
        "长江是中国最长的河流。",
        "中英混合：我用 Python 写了一个 tokenizer。",
        "数字：2024年1月15日，温度23度。",
        "繁體中文：臺灣、香港和澳門。",
        "标点符号：，。？！：；“”《》（）",
        "一二三四五六七八九十",
        "机器学习、深度学习、神经网络",
        "这是一个很长的句子，它包含了很多逗号，很多停顿，很多不同的词语。",
        "春天来了，花开了，草绿了。",
        "请把下面的句子翻译成英文。",
        "鑫龘靐齉",  # rare characters (not in the training text): byte fallback
        "你好 世界",
        " 你好",
        "你好 ",
        "中文\n中文",
        "中文\t中文",
        "注意：<s> 和 </s> 是特殊标记。",
        "日本語のテキストも少しあります。",
        "한국어 텍스트도 있습니다.",
        "我们今天很开心 😄，天气很好 ☀️！",
    )
    add(
        "emoji_4byte",
        "😀",
        "😀😃😄😁",
        "Good job 👍!",
        "❤️",
        "👨‍👩‍👧‍👦",
        "👋🏻 👋🏽 👋🏿",
        "🇨🇳🇺🇸🇬🇧",
        "🚀 to the 🌕",
        "𝐀𝐁𝐂 𝑥𝑦𝑧 𝔸𝔹ℂ",
        "𐌰𐌱𐌲 𓀀𓀁",
        "𝄞 music",
        "𠀀𠀁𠮷",
        "🦩🦚🦜",  # not in the training text
        "a😀b",
        " 😀 ",
        "😀\n😀",
        "🍕🍔🍟🌭",
        "🏳️‍🌈",
        "🧑🏽‍💻 coding",
        "\U0001fae0\U0001fae1",  # newer emoji
        "\U0010fffd",  # plane 16 private use
        "\U000e0001\U000e0041",  # tag characters
        "😀" * 20,
        "emoji at end 🎉",
        "🎉 emoji at start",
    )
    add(
        "whitespace",
        " ",
        "  ",
        "   ",
        "    ",
        "        ",
        "\t",
        "\t\t",
        "\n",
        "\n\n",
        "\n\n\n",
        "\r\n",
        "\r",
        " \n ",
        "\t \n",
        "a b",
        "a  b",
        "a   b",
        "a    b",
        "a\tb",
        "a\t\tb",
        "a\nb",
        "a\n\nb",
        "a \nb",
        "a\n b",
        "a \n b",
        "a\r\nb",
        "a \t b",
        "    indented line",
        "\tindented with a tab",
        "line one\nline two\n\nline four",
        "trailing tab\t",
        "trailing newline\n",
        "def f():\n    return 1\n",
        "a\u00a0b",  # no-break space
        "a\u3000b",  # ideographic space
        "a\u2028b",  # line separator
        "a\u2029b",  # paragraph separator
        "a\u0085b",  # next line
        "a\u1680b",  # ogham space mark
        "a\u180eb",  # Mongolian vowel separator: not whitespace since Unicode 6.3
        "a\u200bb",  # zero width space: not whitespace
        "a\u2003b",  # em space
        "a\u202fb",  # narrow no-break space
        "a\u205fb",  # medium mathematical space
        "a\x1cb\x1dc\x1ed\x1fe",  # Python's str.isspace() says yes, the regex module says no
        "a\x0bb\x0cc",  # vertical tab, form feed
        "\u3000\u3000中文",
        " \u00a0 x",
        "x \u3000 ",
        "a \x1c b",
        "  \x1f  ",
        "\u2028\u2029",
        "\u0085",
    )
    # "a", then two spaces and X: if X is whitespace, "  X" is one pre-token (the run ends the text) and BPE can
    # merge "ĠĠ"; if not, the run gives its last space to X: " ", " X". So these pin down GPT-2's \s exactly.
    chars = "\x1c\x1d\x1e\x1f\u180e\u200b\x85\u1680\u2028\u3000\xa0\u2003\u202f\u205f\x0b\x0c"
    add("whitespace", *(f"a  {ch}" for ch in chars))
    add(
        "leading_trailing",
        " Hello",
        "  Hello",
        "   Hello",
        "Hello ",
        "Hello  ",
        " Hello ",
        "  Hello  world  ",
        " a",
        "a ",
        " 1",
        "1 ",
        " ,",
        ", ",
        " .",
        "\tHello",
        "Hello\t",
        "\nHello",
        "Hello\n",
        " \tHello",
        "\t Hello",
        " 中文",
        "中文 ",
        " 😀",
        "😀 ",
        " <s>",
        "<s> ",
        " </s> ",
    )
    add(
        "digits",
        "0",
        "1",
        "42",
        "123",
        "1234567890",
        "3.14159",
        "2,718",
        "1,000,000",
        "-5",
        "+1 555 0100",
        "1e-05",
        "0x1F",
        "v4.46.3",
        "2024-01-15",
        "09:45:30",
        "100%",
        "$10.99",
        "²³¹",  # superscript digits are \p{N} but not Nd
        "½ ¾ ⅓",
        "٣٤٥",  # Arabic-Indic digits
        "४५६",  # Devanagari digits
        "Ⅻ Ⅳ",  # Roman numerals (Nl)
        "①②③",
        "a1b2c3",
        "abc123def",
        "31415926535897932384626433832795028841971693993751",
        "12 34  56",
    )
    add(
        "contractions",
        "it's",
        "It's a dog's life",
        "don't",
        "can't won't shouldn't",
        "we're they're you're",
        "I've we've",
        "I'm",
        "I'll we'll",
        "I'd he'd",
        "IT'S",
        "I'LL",
        "DON'T",
        "it’s",  # curly apostrophe
        "''s",
        "'s",
        "'",
        "''",
        "rock 'n' roll",
        "the '90s",
        "O'Neil's",
        "'re'll've'd'm't's",
        "'S 'T 'RE",
        "y'all'd've",
        "' s",
    )
    add(
        "special_tokens",
        "<s>",
        "</s>",
        "<unk>",
        "<pad>",
        "<s></s>",
        "<s><s>",
        "</s></s>",
        "Hello <s>.",
        "Hello</s>world",
        "Hello </s> world",
        "<s>Hello",
        "<s> Hello",
        "Hello<s>",
        "Hello <s>",
        "a<unk>b",
        "a <unk> b",
        "a<pad>b",
        "x </s>",
        "x</s>",
        "</s>x",
        " </s>x",
        "<s>[INST] Hello, how are you? [/INST] I am fine. </s>",
        "The beginning marker <s> and the end marker </s> appear in text.",
        "<s", "s>", "</s", "< s>", "</ s>", "<<s>>", "<s>>", "<</s>",
        "<S>",
        "<s>\n",
        "\n<s>",
        "<s>\t</s>",
        "<s>中文</s>",
        "<s>😀</s>",
        "<extra>",
        "<sep>",
        "Hello <extra> world",
        "Hello<extra>world",
        "a <sep> b",
        "a<sep>b<extra>c",
        "<extra><extra>",
        " <extra> ",
        "<s><extra></s>",
        "<pad><pad> x",
    )
    add(
        "sentencepiece_marker",
        "▁",
        "▁▁",
        "a▁b",
        "▁Hello",
        "Hello▁",
        "▁ ▁",
        "▁<s>",
        "<s>▁",
        "▁\n",
    )
    add(
        "empty_tiny",
        "",
        ".",
        ",",
        "!",
        "?",
        "-",
        "_",
        "~",
        "\\",
        "\"",
        "\u00ad",  # soft hyphen
        "\ufeff",  # byte order mark
        "\ufffd",  # the replacement character itself
        "\x00",
        "\x7f",
        "\u0301",  # a lone combining mark
    )
    add(
        "surrogates",  # lone surrogates cannot be UTF-8 encoded: transformers raises; so must we
        "\ud800",
        "abc\udfff",
        "\ud83d",
        "\ude00",
        "x \ude00\ud83d y",  # low then high: not a pair, so JSON keeps them two lone surrogates
        "\ud83d<s>\ude00",
    )
    add(
        "punctuation_symbols",
        "...",
        "!!!",
        "???",
        "?!",
        "---",
        "***",
        "###",
        "===",
        "~~~",
        "___",
        "((( )))",
        "[[[ ]]]",
        "{{{ }}}",
        "<<< >>>",
        "@#$%^&*",
        "€20 £30 ¥40 ₹50",
        "≤ ≥ ≠ ≈ ∞ √ ∑",
        "→ ← ↔ ⇒",
        "α β γ δ π Σ Π",
        "©®™",
        "°C °F",
        "§¶†‡",
        "•·…",
    )
    add(
        "code",
        "def f(x):\n    return x * 2",
        "for i in range(10):\n\tprint(i)",
        "int main(void) { return 0; }",
        "#include <stdio.h>",
        "x = [1, 2, 3]",
        "if (a && b || !c) {}",
        "const add = (a, b) => a + b;",
        "SELECT * FROM users WHERE id = 1;",
        '{"key": "value", "n": 42}',
        "<html><body>Hi</body></html>",
        "https://example.com/path?q=1&lang=en",
        "C:\\Users\\name\\file.txt",
        "/usr/local/bin/python3",
        "first.last@example.com",
        "#hashtag @handle",
        "a_b_c snake_case camelCase PascalCase",
        "x+=1;y-=2;z*=3",
        "    \n    \n",
        "\t\t\tif x:\n\t\t\t\tpass",
        "`code` and ```blocks```",
    )
    add(
        "other_scripts",
        "Привет, мир!",
        "доброе утро",
        "Γειά σου κόσμε",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "こんにちは世界",
        "안녕하세요 세계",
        "Xin chào thế giới",
        "Ångström Øresund Reykjavík",
        "e\u0301",  # e + combining acute
        "\u00e9",  # precomposed é
        "ﬁ ﬂ",  # ligatures
        "Ｆｕｌｌｗｉｄｔｈ",
        "ǅ ǈ ǋ",  # titlecase letters
        "ʰʲʷ",  # modifier letters
        "ⅰⅱⅲ",
        "ᚠᚢᚦ",
        "ꦲꦏ",
    )

    # A few long strings: paragraphs of the training text and of the corpus itself.
    paragraphs = [p for p in TRAIN_TEXT.read_text(encoding="utf-8").split("\n\n") if not p.startswith("# ")]
    add("long", paragraphs[0][:3000], paragraphs[1][:2000], paragraphs[2][:2000], "\n".join(t for _, t in c[:60]))

    # Seeded random mixtures of everything above, to reach corners nobody thought of.
    rng = random.Random(20241122)
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" " * 10 + "\t\n\r")
        + list(".,;:!?'\"-_()[]{}<>/\\@#$%^&*+=~`|")
        + list("中文你好世界的一是了人我在有他这")
        + ["😀", "👍", "❤️", "🇨🇳", "👨‍👩‍👧", "𠮷", "𝐀"]
        + ["<s>", "</s>", "<unk>", "<pad>", "<extra>", "<sep>", "▁", "'s", "'ll", "'T"]
        + ["\u00a0", "\u3000", "\u2028", "\u0085", "\u1680", "\u180e", "\x1c", "\x1f", "\u200b", "\u0301", "\ufffd"]
        + ["é", "ß", "Ω", "ж", "ا", "न", "ก", "あ", "한", "½", "²", "Ⅻ"]
    )
    for _ in range(60):
        n = rng.randint(1, 24)
        add("random", "".join(rng.choice(pool) for _ in range(n)))
    return c


# ---------------------------------------------------------------------------------------------------------------
# 4. Running transformers
# ---------------------------------------------------------------------------------------------------------------
def load(variant: str):
    cls, folder = VARIANTS[variant]
    return cls.from_pretrained(str(ROOT / folder)), cls.__name__, folder


def encode_record(tok, text: str) -> dict:
    try:
        ids = tok.encode(text)
        ids_plain = tok.encode(text, add_special_tokens=False)
    except Exception as e:  # lone surrogates: record what transformers raised
        return {"error": type(e).__name__}
    record = {
        "ids": ids,
        "ids_no_special": ids_plain,
        "decode": tok.decode(ids),
        "decode_skip": tok.decode(ids, skip_special_tokens=True),
    }
    if tok.added_tokens_encoder.keys() - set(tok.all_special_tokens):  # there is a non-special added token
        record["decode_no_spaces_between"] = tok.decode(ids, spaces_between_special_tokens=False)
    return record


def random_id_sequences(tok, rng: random.Random, count: int) -> list[list[int]]:
    """Id sequences a model could emit: specials, added tokens, byte tokens (often half a character), pieces."""
    vocab = tok.get_vocab()
    special = sorted(set(tok.all_special_ids) | set(tok.added_tokens_decoder))
    byte_like = sorted(i for t, i in vocab.items() if t.startswith("<0x") or len(t) == 1)
    spaces = sorted(i for t, i in vocab.items() if set(t) <= {"▁", "Ġ", "Ċ", "ĉ"})
    everything = sorted(set(vocab.values()))
    utf8_pieces = [[0xE4, 0xB8, 0xAD], [0xF0, 0x9F, 0x98, 0x80], [0xC3, 0xA9], [0xE2, 0x98], [0xF0, 0x9F], [0x80]]
    byte_id = {}
    for t, i in vocab.items():
        if t.startswith("<0x") and len(t) == 6:
            byte_id[int(t[3:5], 16)] = i
    seqs = []
    for _ in range(count):
        seq = []
        for _ in range(rng.randint(0, 12)):
            kind = rng.random()
            if kind < 0.2:
                seq.append(rng.choice(special))
            elif kind < 0.3 and byte_id:
                seq.extend(byte_id[b] for b in rng.choice(utf8_pieces))
            elif kind < 0.45:
                seq.append(rng.choice(byte_like))
            elif kind < 0.55 and spaces:
                seq.append(rng.choice(spaces))
            else:
                seq.append(rng.choice(everything))
        seqs.append(seq)
    return seqs


def decode_records(tok, seqs: list[list[int]]) -> list[dict]:
    records = []
    for ids in seqs:
        r = {"ids": ids, "decode": tok.decode(ids), "decode_skip": tok.decode(ids, skip_special_tokens=True)}
        if tok.added_tokens_encoder.keys() - set(tok.all_special_tokens):
            r["decode_no_spaces_between"] = tok.decode(ids, spaces_between_special_tokens=False)
        records.append(r)
    return records


def batch_records(tok) -> list[dict]:
    if tok.pad_token is None:
        return []
    records = []
    for side in ("right", "left"):
        tok.padding_side = side
        for padding, max_length in ((True, None), ("max_length", 24)):
            out = tok(BATCH_TEXTS, padding=padding, max_length=max_length, return_tensors="np")
            records.append(
                {
                    "texts": BATCH_TEXTS,
                    "padding_side": side,
                    "padding": padding,
                    "max_length": max_length,
                    "input_ids": out["input_ids"].tolist(),
                    "attention_mask": out["attention_mask"].tolist(),
                }
            )
    return records


def run_variant(variant: str, corpus: list[tuple[str, str]]) -> dict:
    tok, class_name, folder = load(variant)
    rng = random.Random(folder.replace("-nonlegacy", ""))  # the same id sequences for slow and fast, legacy or not
    meta = {
        "variant": variant,
        "class": class_name,
        "folder": folder,
        "legacy": getattr(tok, "legacy", None),
        "transformers": transformers.__version__,
        "vocab_size": tok.vocab_size,
        "len": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "padding_side": tok.padding_side,
    }
    return {
        "meta": meta,
        "encode": [dict(category=cat, **encode_record(tok, text)) for cat, text in corpus],
        "decode_ids": decode_records(tok, random_id_sequences(tok, rng, 150)),
        "batches": batch_records(tok),
    }


# ---------------------------------------------------------------------------------------------------------------
# 5. Writing
# ---------------------------------------------------------------------------------------------------------------
def dump_json(obj) -> str:
    """One record per line, non-ASCII kept readable, lone surrogates escaped (they cannot be written as UTF-8)."""
    def line(x):
        s = json.dumps(x, ensure_ascii=False, separators=(",", ":"))
        return "".join(f"\\u{ord(ch):04x}" if "\ud800" <= ch <= "\udfff" else ch for ch in s)

    if isinstance(obj, list):
        return "[\n" + ",\n".join(line(x) for x in obj) + "\n]\n"
    parts = []
    for k, v in obj.items():
        if isinstance(v, list) and v:
            parts.append(json.dumps(k) + ": [\n" + ",\n".join(line(x) for x in v) + "\n]")
        else:
            parts.append(json.dumps(k) + ": " + line(v))
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    print(f"wrote {path.relative_to(ROOT.parent.parent)}  ({path.stat().st_size} bytes, sha256 {digest})")


def differences(a: dict, b: dict) -> dict:
    """Where two variants disagree, by field, listed as corpus indices."""
    out = {}
    for field in ("ids", "ids_no_special", "decode", "decode_skip", "error"):
        idx = [i for i, (x, y) in enumerate(zip(a["encode"], b["encode"])) if x.get(field) != y.get(field)]
        if idx:
            out["encode." + field] = idx
    for field in ("decode", "decode_skip", "decode_no_spaces_between"):
        idx = [i for i, (x, y) in enumerate(zip(a["decode_ids"], b["decode_ids"])) if x.get(field) != y.get(field)]
        if idx:
            out["decode_ids." + field] = idx
    return out


def main() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    make_llama_folders(train_sentencepiece())
    make_opt_folder()
    for folder in list(LLAMA_FOLDERS) + ["opt"]:
        for f in sorted((ROOT / folder).iterdir()):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
            print(f"wrote {f.relative_to(ROOT.parent.parent)}  ({f.stat().st_size} bytes, sha256 {digest})")

    corpus = build_corpus()
    write(ROOT / "corpus.json", dump_json([text for _, text in corpus]))
    results = {}
    for variant in VARIANTS:
        results[variant] = run_variant(variant, corpus)
        write(EXPECTED / f"{variant}.json", dump_json(results[variant]))

    pairs = [
        ("llama_slow_legacy", "llama_fast_legacy"),
        ("llama_slow_nonlegacy", "llama_fast_nonlegacy"),
        ("llama_slow_legacy", "llama_slow_nonlegacy"),
        ("llama_extra_slow", "llama_extra_fast"),
        ("opt_slow", "opt_fast"),
    ]
    summary = {f"{a} vs {b}": differences(results[a], results[b]) for a, b in pairs}
    write(EXPECTED / "differences.json", json.dumps(summary, indent=1) + "\n")
    for name, diff in summary.items():
        print(f"{name}: " + (", ".join(f"{k} {len(v)}" for k, v in diff.items()) or "identical"))
    print(f"corpus: {len(corpus)} strings; python {sys.version.split()[0]}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
