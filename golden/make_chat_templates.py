"""Record what transformers 4.46.3's apply_chat_template returns, for tests/test_chat_template.py.

For each golden tokenizer folder (golden/tokenizers/llama, llama-nonlegacy, llama-extra, opt), loaded as the slow
and the fast transformers class (rows where both give the same are stored once, listing both), and for each
template below written into a copy of the folder's
tokenizer_config.json (as a checkpoint ships it), every case's conversation is rendered with tokenize=False (the
text) and tokenize=True (the ids), or the error transformers raised is recorded. The same call with the template
passed as chat_template= is checked to give the same result. Named templates (a list in the config), and a folder
with no template at all, are recorded too. Writes golden/tokenizers/chat_templates.json.

It needs transformers 4.46.3, tokenizers, sentencepiece, protobuf and jinja2 (the `golden` extra and jinja2):

    python golden/make_chat_templates.py

The output is deterministic (no template here calls strftime_now).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import jinja2
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent / "tokenizers"
OUT = ROOT / "chat_templates.json"

# The templates, as their models' tokenizer_config.json files have them.
TEMPLATES = {
    # meta-llama/Llama-2-7b-chat-hf: system message inside the first [INST]; roles must alternate
    "llama-2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # ChatML (OpenHermes, Qwen without a system default, ...)
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # HuggingFaceH4/zephyr-7b-beta: one statement per line, so trim_blocks matters
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
        "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
        "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct: header tokens, bos before the first message
    "llama-3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
        "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # not a model's: the environment's features (indented blocks for lstrip_blocks, loop controls, namespace,
    # transformers' tojson with its options, tools and documents, every special-token variable, extra keyword
    # arguments, a {% generation %} block)
    "features": """{%- set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' and skip_system | default(false) %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if ns.turns > max_turns | default(99) %}
        {% break %}
    {% endif %}
[{{ ns.turns }}] {{ message['role'] | upper }} {{ message | tojson }}
{% endfor %}
{% if tools %}
TOOLS {{ tools | tojson(indent=2, sort_keys=true) }}
{% endif %}
{% if documents %}
DOCS {{ documents | tojson(separators=(',', ':')) }}
{% endif %}
SPECIALS {{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token | default('no pad') }}|\
{{ sep_token | default('no sep') }}|{{ additional_special_tokens | default([]) | join(',') }}|{{ note | default('') }}
{% if add_generation_prompt %}
    {% generation %}ASSISTANT:{% endgeneration %}
{% endif %}
""",
}


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = {
    "system_chat": [msg("system", "You are a helpful assistant."), msg("user", "What is 2 + 2?"),
                    msg("assistant", "2 + 2 = 4."), msg("user", "And 3 + 3?")],
    "no_system": [msg("user", "Hi!"), msg("assistant", "Hello, how can I help?"), msg("user", "Tell me a joke.")],
    "single_user": [msg("user", "  Spaces around  ")],
    "prefill": [msg("user", "Name a colour."), msg("assistant", "The colour is ")],
    "prefill_empty": [msg("user", "Name a colour."), msg("assistant", "")],  # the cut keeps all, then rstrips
    "unicode": [msg("system", "Réponds en français 🙂"), msg("user", "中文 😀 and </s> <s> inside text"),
                msg("assistant", 'D\'accord: "quotes" <b>&amp;</b>\n new line')],
    "bad_roles": [msg("user", "First"), msg("user", "Second")],  # Llama-2's template raises
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
DOCUMENTS = [{"title": "Doc <1>", "text": "Some text, ünïcode."}]

# case name -> apply_chat_template arguments (besides the template). "conversation" names one of CONVERSATIONS,
# or a list of them (a batch).
CASES = {
    "system_chat": {"conversation": "system_chat"},
    "system_chat_gen": {"conversation": "system_chat", "add_generation_prompt": True},
    "no_system_gen": {"conversation": "no_system", "add_generation_prompt": True},
    "single_user": {"conversation": "single_user"},
    "prefill": {"conversation": "prefill", "continue_final_message": True},
    "prefill_empty": {"conversation": "prefill_empty", "continue_final_message": True},
    "unicode_gen": {"conversation": "unicode", "add_generation_prompt": True, "note": "<&> ünïcode"},
    "kwargs": {"conversation": "system_chat", "skip_system": True, "max_turns": 2, "bos_token": "[BOS]"},
    "tools_documents": {"conversation": "no_system", "tools": TOOLS, "documents": DOCUMENTS},
    "bad_roles": {"conversation": "bad_roles"},
    "batch": {"conversation": ["system_chat", "no_system"], "add_generation_prompt": True},
    "return_dict": {"conversation": "no_system", "return_dict": True},
}

# folder -> variants: (name, use_fast, the class AutoTokenizer must give)
FOLDERS = {
    "llama": [("llama_slow_legacy", False, "LlamaTokenizer"), ("llama_fast_legacy", True, "LlamaTokenizerFast")],
    "llama-nonlegacy": [("llama_slow_nonlegacy", False, "LlamaTokenizer"),
                        ("llama_fast_nonlegacy", True, "LlamaTokenizerFast")],
    "llama-extra": [("llama_extra_slow", False, "LlamaTokenizer"), ("llama_extra_fast", True, "LlamaTokenizerFast")],
    "opt": [("opt_slow", False, "GPT2Tokenizer"), ("opt_fast", True, "GPT2TokenizerFast")],
}
# named templates in the config: (config's chat_template list, [(case name, chat_template argument, tools)])
NAMED = {
    "with_default": ([{"name": "default", "template": TEMPLATES["chatml"]},
                      {"name": "zephyr", "template": TEMPLATES["zephyr"]},
                      {"name": "tool_use", "template": TEMPLATES["features"]}],
                     [("default", None, None), ("by_name", "zephyr", None), ("tool_use", None, TOOLS),
                      ("text_argument", TEMPLATES["llama-3"], None)]),
    "without_default": ([{"name": "a", "template": TEMPLATES["chatml"]},
                         {"name": "b", "template": TEMPLATES["zephyr"]}],
                        [("no_name", None, None), ("by_name", "b", None)]),
}
NAMED_CONVERSATION = "no_system"


def conversation_of(case: dict):
    names = case["conversation"]
    return [CONVERSATIONS[n] for n in names] if isinstance(names, list) else CONVERSATIONS[names]


def call(tok, case: dict, tokenize: bool, **extra):
    args = {k: v for k, v in case.items() if k != "conversation"}
    if not tokenize:
        args.pop("return_dict", None)
    try:
        out = tok.apply_chat_template(conversation_of(case), tokenize=tokenize, **args, **extra)
    except Exception as e:  # recorded: the test expects refimpl to raise too
        return {"error": f"{type(e).__name__}: {e}"}
    return {"value": dict(out) if hasattr(out, "keys") else out}


def record(tok, case: dict, **extra) -> dict:
    text, ids = call(tok, case, False, **extra), call(tok, case, True, **extra)
    if "error" in text or "error" in ids:
        assert "error" in text and "error" in ids, (text, ids)
        return {"error": text["error"]}
    return {"text": text["value"], "ids": ids["value"]}


def folder_with_template(src: Path, tmp: Path, template) -> Path:
    dst = tmp / src.name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    if template is None:
        config.pop("chat_template", None)
    else:
        config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return dst


def load(folder: Path, use_fast: bool, class_name: str):
    tok = AutoTokenizer.from_pretrained(str(folder), use_fast=use_fast)
    assert type(tok).__name__ == class_name, (folder, type(tok).__name__)
    return tok


def merged(rows: list[dict]) -> list[dict]:
    """Rows that differ only in their variant, as one row listing the variants (slow and fast mostly agree)."""
    out = []
    for row in rows:
        key = {k: v for k, v in row.items() if k != "variant"}
        same = next((r for r in out if {k: v for k, v in r.items() if k != "variants"} == key), None)
        if same is None:
            out.append({"variants": [row["variant"]], **key})
        else:
            same["variants"].append(row["variant"])
    return out


def main():
    assert transformers.__version__ == "4.46.3", transformers.__version__
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    records, named, no_template = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for folder, variants in FOLDERS.items():
            rows, named_rows, no_template_rows = [], [], []
            for variant, use_fast, class_name in variants:
                plain = load(ROOT / folder, use_fast, class_name)
                for template_name, template in TEMPLATES.items():
                    tok = load(folder_with_template(ROOT / folder, tmp, template), use_fast, class_name)
                    for case_name, case in CASES.items():
                        got = record(tok, case)
                        assert got == record(plain, case, chat_template=template), (variant, template_name, case_name)
                        rows.append({"variant": variant, "template": template_name, "case": case_name, **got})
                for config_name, (config_template, calls) in NAMED.items():
                    tok = load(folder_with_template(ROOT / folder, tmp, config_template), use_fast, class_name)
                    for call_name, argument, tools in calls:
                        case = {"conversation": NAMED_CONVERSATION, "chat_template": argument, "tools": tools}
                        named_rows.append({"variant": variant, "config": config_name, "case": call_name,
                                           **record(tok, case)})
                no_template_rows.append({"variant": variant, **record(plain, {"conversation": NAMED_CONVERSATION})})
            records += merged(rows)
            named += merged(named_rows)
            no_template += merged(no_template_rows)
    data = {
        "about": "transformers 4.46.3 apply_chat_template outputs; written by golden/make_chat_templates.py",
        "versions": {"transformers": transformers.__version__, "jinja2": jinja2.__version__},
        "templates": TEMPLATES, "conversations": CONVERSATIONS, "cases": CASES,
        "named_templates": {k: {"config": v[0], "calls": [{"case": c, "chat_template": a, "tools": t}
                                                          for c, a, t in v[1]]} for k, v in NAMED.items()},
        "named_conversation": NAMED_CONVERSATION,
        "folders": {folder: [v for v, _, _ in variants] for folder, variants in FOLDERS.items()},
        "records": records, "named": named, "no_template": no_template,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(dumps(data))
    print(f"wrote {OUT}: {len(records)} records, {len(named)} named-template records")


def dumps(data: dict) -> str:
    """JSON with one record per line."""
    head = {k: v for k, v in data.items() if k not in ("records", "named", "no_template")}
    lines = [json.dumps(head, ensure_ascii=False, indent=1)[:-2] + ","]
    for key in ("records", "named", "no_template"):
        rows = [json.dumps(r, ensure_ascii=False) for r in data[key]]
        lines.append(f' "{key}": [\n  ' + ",\n  ".join(rows) + "\n ]" + ("," if key != "no_template" else ""))
    return "\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    main()
