"""apply_chat_template against transformers 4.46.3's recorded outputs (golden/tokenizers/chat_templates.json).

golden/make_chat_templates.py rendered, with transformers' own AutoTokenizer (slow and fast) on each golden tokenizer
folder, five templates (Llama-2-chat, ChatML, Zephyr, Llama-3 and one that exercises the Jinja environment) written
into tokenizer_config.json, for conversations with and without a system message, several turns,
add_generation_prompt, continue_final_message, extra keyword arguments, tools and documents, a batch, return_dict
and a conversation Llama-2's template refuses. Here refimpl's tokenizer for the same folder must give the same text
and the same ids, or raise where transformers raised. The slow variants are checked with sentencepiece (refimpl's
LlamaTokenizer), the fast ones with sentencepiece hidden (LlamaJsonTokenizer, which reproduces LlamaTokenizerFast).
Nothing here needs transformers; rendering needs jinja2.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import warnings
from datetime import datetime
from pathlib import Path

import pytest

from refimpl.errors import RefimplError
from refimpl.tokenizers import (
    ChatTemplateError,
    GPT2Tokenizer,
    InputTypeError,
    LlamaJsonTokenizer,
    TokenizerFileError,
    TokenizerUsageError,
    load_tokenizer,
)
from refimpl.tokenizers.chat import BUILTIN_TEMPLATES, compile_template

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden" / "tokenizers"


@functools.cache
def golden() -> dict:
    return json.loads((GOLDEN / "chat_templates.json").read_text(encoding="utf-8"))


FOLDER_OF = {v: folder for folder, variants in golden()["folders"].items() for v in variants}
VARIANTS = sorted(FOLDER_OF)
TEMPLATES = sorted(golden()["templates"])
MESSAGES = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]


@pytest.fixture
def jinja():
    return pytest.importorskip("jinja2")


def load(folder: Path, variant: str, monkeypatch, **overrides):
    """refimpl's tokenizer for the variant: a fast Llama variant is the tokenizer.json path (no sentencepiece)."""
    if variant.startswith("llama") and "fast" in variant:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "sentencepiece", None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tok = load_tokenizer(folder, **overrides)
        assert isinstance(tok, LlamaJsonTokenizer)
        return tok
    tok = load_tokenizer(folder, **overrides)
    assert type(tok).__name__ == ("GPT2Tokenizer" if variant.startswith("opt") else "LlamaTokenizer")
    return tok


def with_template(tmp_path: Path, variant: str, template) -> Path:
    """A copy of the variant's golden folder whose tokenizer_config.json has this chat_template (None: removed)."""
    folder = tmp_path / FOLDER_OF[variant]
    shutil.copytree(GOLDEN / FOLDER_OF[variant], folder, dirs_exist_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    config_file.write_text(json.dumps(config), encoding="utf-8")
    return folder


def conversation_of(case: dict):
    names = case["conversation"]
    conversations = golden()["conversations"]
    return [conversations[n] for n in names] if isinstance(names, list) else conversations[names]


def check(tok, case: dict, record: dict, **extra):
    """refimpl's text and ids for this case are transformers' (or both raise, with transformers' message)."""
    args = {k: v for k, v in case.items() if k != "conversation"}
    text_args = {k: v for k, v in args.items() if k != "return_dict"}
    if "error" in record:
        message = record["error"].split(": ", 1)[1]
        for tokenize, kwargs in ((False, text_args), (True, args)):
            with pytest.raises(ChatTemplateError, match=re.escape(message)):
                tok.apply_chat_template(conversation_of(case), tokenize=tokenize, **kwargs, **extra)
        return
    assert tok.apply_chat_template(conversation_of(case), tokenize=False, **text_args, **extra) == record["text"]
    assert tok.apply_chat_template(conversation_of(case), **args, **extra) == record["ids"]


def records(variant: str, template: str) -> list[dict]:
    return [r for r in golden()["records"] if variant in r["variants"] and r["template"] == template]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers(variant, template, tmp_path, monkeypatch, jinja):
    """The template in tokenizer_config.json, and the same template passed as chat_template=: transformers' text,
    ids, batch, return_dict, or its raise_exception message."""
    in_config = load(with_template(tmp_path / "config", variant, golden()["templates"][template]), variant, monkeypatch)
    plain = load(with_template(tmp_path / "plain", variant, None), variant, monkeypatch)
    cases = golden()["cases"]
    checked = records(variant, template)
    assert {r["case"] for r in checked} == set(cases)
    for record in checked:
        check(in_config, cases[record["case"]], record)
        check(plain, cases[record["case"]], record, chat_template=golden()["templates"][template])


def test_goldens_cover_the_brief():
    """Every golden folder, slow and fast; every template renders something; Llama-2's template raises on roles that
    do not alternate; continue_final_message leaves the last message open."""
    assert set(golden()["folders"]) == {"llama", "llama-nonlegacy", "llama-extra", "opt"}
    errors = [(r["template"], r["case"]) for r in golden()["records"] if "error" in r]
    assert set(errors) == {("llama-2", "bad_roles")}
    prefill = [r for r in golden()["records"] if r["case"] == "prefill"]
    assert prefill and all(r["text"].endswith("The colour is") for r in prefill)


@pytest.mark.parametrize("variant", VARIANTS)
def test_named_templates(variant, tmp_path, monkeypatch, jinja):
    """A list of {name, template} in the config: "default", a name, "tool_use" with tools, a template as text;
    without a "default", transformers raises, and so do we."""
    for record in (r for r in golden()["named"] if variant in r["variants"]):
        spec = golden()["named_templates"][record["config"]]
        tok = load(with_template(tmp_path / record["config"], variant, spec["config"]), variant, monkeypatch)
        call = next(c for c in spec["calls"] if c["case"] == record["case"])
        case = {"conversation": golden()["named_conversation"], "chat_template": call["chat_template"],
                "tools": call["tools"]}
        if "error" in record:
            assert "no default" in record["error"]
            for tokenize in (False, True):
                with pytest.raises(ChatTemplateError, match="none is named 'default'"):
                    tok.apply_chat_template(conversation_of(case), tokenize=tokenize, tools=call["tools"])
        else:
            check(tok, case, record)


def test_builtin_llama_2_is_the_hub_template():
    assert BUILTIN_TEMPLATES["llama-2"] == golden()["templates"]["llama-2"]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("llama")])
def test_llama_without_template_uses_llama_2(variant, tmp_path, monkeypatch, jinja):
    """transformers 4.46.3 raises without a template; refimpl's Llama tokenizers fall back on Llama-2-chat, whose
    output is what transformers gives with that template."""
    assert all("error" in r for r in golden()["no_template"])  # transformers: no template, no chat
    tok = load(with_template(tmp_path, variant, None), variant, monkeypatch)
    assert tok.get_chat_template() == golden()["templates"]["llama-2"]
    for record in records(variant, "llama-2"):
        check(tok, golden()["cases"][record["case"]], record)


def test_llama_2_by_name_on_opt(monkeypatch, jinja):
    tok = load(GOLDEN / "opt", "opt_slow", monkeypatch)
    for record in records("opt_slow", "llama-2"):
        check(tok, golden()["cases"][record["case"]], record, chat_template="llama-2")


def test_config_template_wins_over_the_default(tmp_path, monkeypatch, jinja):
    tok = load(with_template(tmp_path, "llama_slow_legacy", golden()["templates"]["chatml"]), "llama_slow_legacy",
               monkeypatch)
    assert tok.apply_chat_template(MESSAGES, tokenize=False).startswith("<|im_start|>user")


def test_opt_without_template_raises(monkeypatch):
    tok = load(GOLDEN / "opt", "opt_slow", monkeypatch)
    assert isinstance(tok, GPT2Tokenizer)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_template_from_load_tokenizer_override(jinja):
    tok = load_tokenizer(GOLDEN / "opt", chat_template="{{ messages[0]['content'] }}{{ eos_token }}")
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == "Hi!</s>"


# --- bad input ------------------------------------------------------------------------------------------------

BAD_CONVERSATIONS = {
    "a string": "Hi!",
    "a dict": {"role": "user", "content": "Hi!"},
    "empty": [],
    "a string message": ["Hi!"],
    "no content": [{"role": "user"}],
    "no role": [{"content": "Hi!"}],
    "int content": [{"role": "user", "content": 5}],
    "None role": [{"role": None, "content": "Hi!"}],
    "list content": [{"role": "user", "content": [{"type": "text", "text": "Hi!"}]}],
    "empty batch item": [[]],
    "batch with a string": [[{"role": "user", "content": "Hi!"}], "Hi!"],
    "None": None,
}


@pytest.mark.parametrize("name", list(BAD_CONVERSATIONS))
@pytest.mark.parametrize("tokenize", [False, True])
def test_bad_conversation_is_a_refimpl_error(name, tokenize, monkeypatch):
    """Never a jinja2 traceback: a template that would index into the messages gets a checked conversation."""
    tok = load(GOLDEN / "llama", "llama_slow_legacy", monkeypatch)
    with pytest.raises(InputTypeError, match="conversation"):
        tok.apply_chat_template(BAD_CONVERSATIONS[name], tokenize=tokenize)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"add_generation_prompt": True, "continue_final_message": True}, TokenizerUsageError, "cannot be used together"),
    ({"tokenize": False, "return_dict": True}, TokenizerUsageError, "return_dict=True needs tokenize=True"),
    ({"messages": []}, TokenizerUsageError, "messages= cannot be passed"),
    ({"tools": "get_weather"}, InputTypeError, "tools must be a list of dicts"),
    ({"tools": [print]}, InputTypeError, "tools must be a list of dicts"),
    ({"documents": ["text"]}, InputTypeError, "documents must be a list of dicts"),
    ({"truncation": True}, TokenizerUsageError, "truncation"),
    ({"return_assistant_tokens_mask": True, "return_dict": True}, TokenizerUsageError, "assistant"),
    ({"tokenizer_kwargs": {"add_special_tokens": True}}, TokenizerUsageError, "tokenizer_kwargs"),
    ({"chat_template": 3}, InputTypeError, "chat_template must be"),
])
def test_bad_arguments(kwargs, error, match, monkeypatch):
    tok = load(GOLDEN / "llama", "llama_slow_legacy", monkeypatch)
    with pytest.raises(error, match=match):
        tok.apply_chat_template(MESSAGES, **kwargs)


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m['content'] }}", "syntax error at line 1"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ("{{ messages.append(1) }}", "SecurityError"),
    ("{{ raise_exception('no system messages, please') }}", "refused this conversation: no system messages, please"),
    ("{{ messages[5]['content'] }}", "UndefinedError"),
])
def test_template_errors_are_chat_template_errors(template, match, monkeypatch, jinja):
    tok = load(GOLDEN / "llama", "llama_slow_legacy", monkeypatch)
    for tokenize in (False, True):
        with pytest.raises(ChatTemplateError, match=re.escape(match)) as info:
            tok.apply_chat_template(MESSAGES, chat_template=template, tokenize=tokenize)
        assert not isinstance(info.value, jinja.TemplateError)
        assert isinstance(info.value, RefimplError)


def test_continue_final_message_needs_the_content_in_the_text(monkeypatch, jinja):
    tok = load(GOLDEN / "llama", "llama_slow_legacy", monkeypatch)
    template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="does not appear in the rendered chat"):
        tok.apply_chat_template(MESSAGES, chat_template=template, continue_final_message=True)


def test_strftime_now(monkeypatch, jinja):
    tok = load(GOLDEN / "opt", "opt_slow", monkeypatch)
    before = datetime.now().strftime("%Y-%m")
    text = tok.apply_chat_template(MESSAGES, chat_template="{{ strftime_now('%Y-%m') }}", tokenize=False)
    assert text in (before, datetime.now().strftime("%Y-%m"))


@pytest.mark.parametrize("value, match", [
    (5, "chat_template must be a string"),
    ([{"name": "default"}], r"chat_template\[0\] must be an object with 'name' and 'template'"),
    ([{"name": "default", "template": 1}], "names and templates must be strings"),
])
def test_bad_chat_template_in_config(value, match, tmp_path, monkeypatch):
    folder = with_template(tmp_path, "opt_slow", value)
    with pytest.raises(TokenizerFileError, match=match):
        load_tokenizer(folder)
    with pytest.raises(TokenizerUsageError, match=match):
        load_tokenizer(GOLDEN / "opt", chat_template=value)


def test_without_jinja2_the_error_names_the_extra(monkeypatch):
    tok = load(GOLDEN / "opt", "opt_slow", monkeypatch)
    compile_template.cache_clear()  # a template compiled earlier would not need jinja2
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(ChatTemplateError, match=re.escape("pip install 'refimpl[chat]'")):
        tok.apply_chat_template(MESSAGES, chat_template="{{ 1 }}")
    compile_template.cache_clear()


def test_chat_extra_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(req.startswith("jinja2>=3.1") for req in project["optional-dependencies"]["chat"])


def test_import_does_not_load_jinja2():
    code = ("import sys, refimpl, refimpl.tokenizers, refimpl.tokenizers.chat; "
            "tok = refimpl.load_tokenizer('golden/tokenizers/opt'); tok.encode('hi'); "
            "print('jinja2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
