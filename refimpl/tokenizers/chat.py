"""Chat templates: a conversation (a list of {"role", "content"} messages) -> the prompt text a chat model expects.

A checkpoint's tokenizer_config.json may carry a `chat_template`: a Jinja template that writes the messages in
the model's own format (control tokens, headers, where bos goes). This module renders it as transformers 4.46.3
does (PreTrainedTokenizerBase.apply_chat_template / get_chat_template, tokenization_utils_base.py:1709-1974, and
_compile_jinja_template, utils/chat_template_utils.py:363-428): the same Jinja environment, filters and globals,
the same variables, the same cut for continue_final_message, and the rendered text encoded without adding
special tokens (the template writes them itself).

jinja2 is an optional dependency (pip install 'refimpl[chat]'); it is imported only when a template is rendered.

Where refimpl differs: errors are refimpl errors (a template's raise_exception(...) raises ChatTemplateError,
not jinja2's TemplateError); a checkpoint without a template gets the Llama-2-chat format when its tokenizer is a
Llama one (transformers 4.46.3 raises), and "llama-2" names that built-in template; messages must be dicts with
string role and content; tools are taken as JSON-schema dicts only; no truncation, no assistant-token masks.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

from ..errors import RefimplError
from .errors import ChatTemplateError, InputTypeError, TokenizerFileError, TokenizerUsageError
from .files import summary

# The chat template of meta-llama/Llama-2-7b-chat-hf (its tokenizer_config.json), character for character: a system
# message goes inside the first [INST] between <<SYS>> markers; roles must alternate user/assistant.
LLAMA_2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Built-in templates, by the name passed as chat_template=.
BUILTIN_TEMPLATES = {"llama-2": LLAMA_2_CHAT}

INSTALL_HINT = "pip install 'refimpl[chat]'"
# Names apply_chat_template passes to the template itself; a keyword argument cannot replace them.
RESERVED = ("messages", "tools", "documents", "add_generation_prompt")
TOKENIZER_KWARGS = ("padding_side",)  # what tokenizer_kwargs may hold: the rest of __call__ is set here


def read_chat_template(value, where):
    """tokenizer_config.json's chat_template: None, a template string, or named templates, either as a list of
    {"name": ..., "template": ...} objects (how save_pretrained writes them) or as a {name: template} object.
    Returns None, a str or a {name: template} dict, as transformers keeps it; else a TokenizerFileError."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for i, entry in enumerate(value):
            if not isinstance(entry, dict) or "name" not in entry or "template" not in entry:
                raise TokenizerFileError(f"{where}: chat_template[{i}] must be an object with 'name' and 'template', "
                                         f"got {summary(entry)}")
            items.append((entry["name"], entry["template"]))
    else:
        raise TokenizerFileError(f"{where}: chat_template must be a string, a list of {{name, template}} objects "
                                 f"or null, got {summary(value)}")
    for name, template in items:
        if not isinstance(name, str) or not isinstance(template, str):
            raise TokenizerFileError(f"{where}: chat_template {summary(name)}: names and templates must be strings, "
                                     f"got {summary(template)}")
    return dict(items)


def get_chat_template(tokenizer, chat_template=None, tools=None) -> str:
    """The template text apply_chat_template will use (transformers' get_chat_template, plus built-in names).

    With named templates in the config, chat_template= may name one; without, "default" is used ("tool_use" when
    tools are given and there is one). A chat_template= that names neither a config template nor a built-in one
    is the template text itself. With no template anywhere, a tokenizer with a default_chat_template (Llama's:
    "llama-2") uses that built-in one; any other raises ChatTemplateError.
    """
    own = tokenizer.chat_template
    if chat_template is not None and not isinstance(chat_template, str):
        raise InputTypeError(f"chat_template must be a template string or a template name, "
                             f"got {summary(chat_template)}")
    if isinstance(own, dict):
        if chat_template is not None and chat_template in own:
            return own[chat_template]
        if chat_template is None:
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ChatTemplateError(
                f"{tokenizer.source}: tokenizer_config.json has several chat templates and none is named 'default'; "
                f"pass chat_template= with one of {sorted(own)}, or with a template of your own"
            )
    if chat_template is None:
        if own is not None:
            return own
        default = getattr(tokenizer, "default_chat_template", None)
        if default is not None:
            return BUILTIN_TEMPLATES[default]
        raise ChatTemplateError(
            f"{tokenizer.source}: this tokenizer has no chat template (no chat_template in tokenizer_config.json), "
            f"and only Llama tokenizers have a built-in default; pass chat_template= with a Jinja template "
            f"or the name of a built-in one ({', '.join(BUILTIN_TEMPLATES)})"
        )
    return BUILTIN_TEMPLATES.get(chat_template, chat_template)


def apply_chat_template(tokenizer, conversation, tools=None, documents=None, chat_template=None,
                        add_generation_prompt=False, continue_final_message=False, tokenize=True, padding=False,
                        truncation=False, max_length=None, return_tensors=None, return_dict=False,
                        return_assistant_tokens_mask=False, tokenizer_kwargs=None, **kwargs):
    """See Tokenizer.apply_chat_template."""
    if return_dict and not tokenize:
        raise TokenizerUsageError("return_dict=True needs tokenize=True: there is no dict of tokenizer outputs "
                                  "for a string")
    if continue_final_message and add_generation_prompt:
        raise TokenizerUsageError("continue_final_message and add_generation_prompt cannot be used together: "
                                  "the first continues the last message, the second starts a new assistant message")
    if truncation:
        raise TokenizerUsageError("truncation is not implemented in refimpl's tokenizers")
    if return_assistant_tokens_mask:
        raise TokenizerUsageError("return_assistant_tokens_mask is not implemented in refimpl")
    tokenizer_kwargs = dict(tokenizer_kwargs or {})
    unknown = sorted(set(tokenizer_kwargs) - set(TOKENIZER_KWARGS))
    if unknown:
        raise TokenizerUsageError(f"tokenizer_kwargs may hold {', '.join(TOKENIZER_KWARGS)}; got {unknown}")
    clash = sorted(set(kwargs) & set(RESERVED))
    if clash:
        raise TokenizerUsageError(f"{clash[0]}= cannot be passed to the template as a keyword: apply_chat_template "
                                  "sets it (the conversation is the first argument)")
    chats, batched = check_conversation(conversation)
    check_tools_and_documents(tools, documents)

    compiled = compile_template(get_chat_template(tokenizer, chat_template, tools))
    # the special tokens as strings, as transformers' special_tokens_map: only those set; kwargs may replace them
    template_kwargs = {**special_tokens_map(tokenizer), **kwargs}
    rendered = []
    for chat in chats:
        text = render(compiled, messages=chat, tools=tools, documents=documents,
                      add_generation_prompt=add_generation_prompt, **template_kwargs)
        if continue_final_message:
            text = cut_after_final_message(text, chat[-1]["content"])
        rendered.append(text)
    if not tokenize:
        return rendered if batched else rendered[0]
    out = tokenizer(rendered if batched else rendered[0], padding=padding, max_length=max_length,
                    add_special_tokens=False, return_tensors=return_tensors, **tokenizer_kwargs)
    return out if return_dict else out["input_ids"]


def special_tokens_map(tokenizer) -> dict:
    """{"bos_token": "<s>", ..., "additional_special_tokens": [...]}: the names that are set, with their text."""
    specials = tokenizer.specials
    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    out = {name: specials.named[name] for name in names if specials.named.get(name)}
    if specials.additional:
        out["additional_special_tokens"] = list(specials.additional)
    return out


def check_conversation(conversation) -> tuple[list[list[dict]], bool]:
    """([conversation, ...], batched): one conversation or a list of them; each a non-empty list of dicts whose
    "role" and "content" are strings. Anything else is an InputTypeError naming the message."""
    shape = "a list of messages ({'role': str, 'content': str} dicts), or a list of such lists"
    if not isinstance(conversation, (list, tuple)):
        raise InputTypeError(f"conversation must be {shape}; got {type(conversation).__name__} {summary(conversation)}")
    if not conversation:
        raise InputTypeError("conversation is empty: give at least one message")
    batched = isinstance(conversation[0], (list, tuple))
    chats = list(conversation) if batched else [conversation]
    for b, chat in enumerate(chats):
        where = f"conversation[{b}]" if batched else "conversation"
        if not isinstance(chat, (list, tuple)):
            raise InputTypeError(f"{where} must be a list of messages (a batch holds only lists), "
                                 f"got {type(chat).__name__} {summary(chat)}")
        if not chat:
            raise InputTypeError(f"{where} is empty: give at least one message")
        for i, message in enumerate(chat):
            if not isinstance(message, dict):
                raise InputTypeError(f"{where}[{i}] must be a dict with 'role' and 'content' strings, "
                                     f"got {type(message).__name__} {summary(message)}")
            for key in ("role", "content"):
                if key not in message:
                    raise InputTypeError(f"{where}[{i}] has no {key!r}: {summary(message)}")
                if not isinstance(message[key], str):
                    raise InputTypeError(f"{where}[{i}][{key!r}] must be a str, got "
                                         f"{type(message[key]).__name__} {summary(message[key])}")
    return [list(chat) for chat in chats], batched


def check_tools_and_documents(tools, documents):
    for name, value in (("tools", tools), ("documents", documents)):
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, dict) for item in value):
            hint = " (JSON schemas; refimpl does not convert Python functions)" if name == "tools" else ""
            raise InputTypeError(f"{name} must be a list of dicts{hint}, got {summary(value)}")


def cut_after_final_message(text: str, content: str) -> str:
    """continue_final_message: the text up to the end of the last message's (stripped) content, then rstripped,
    so that the model continues that message instead of seeing it closed."""
    final = content.strip()
    end = text.rfind(final)
    if end < 0:
        raise ChatTemplateError(f"continue_final_message: the last message's content {summary(final)} does not "
                                "appear in the rendered chat (the template changes it), so it cannot be continued")
    return text[: end + len(final)].rstrip()


# ---------------------------------------------------------------------------------------------------------------
# Jinja
# ---------------------------------------------------------------------------------------------------------------
def import_jinja2():
    try:
        import jinja2
    except ImportError:
        raise ChatTemplateError(f"chat templates need jinja2 (>= 3.1), an optional dependency: "
                                f"{INSTALL_HINT}") from None
    version = tuple(int(p) if p.isdigit() else 0 for p in jinja2.__version__.split(".")[:2])
    if version < (3, 1):
        raise ChatTemplateError(f"chat templates need jinja2 >= 3.1, this is {jinja2.__version__}: {INSTALL_HINT}")
    return jinja2


def raise_exception(message):
    """The template's raise_exception(message): it refuses the conversation (e.g. roles that do not alternate)."""
    raise ChatTemplateError(f"the chat template refused this conversation: {message}")


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson filter: json.dumps, not Jinja's own filter (which escapes <, >, & and ' for HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def compile_template(template: str):
    """The template, compiled in transformers' environment: sandboxed and immutable (a template cannot change the
    messages), trim_blocks and lstrip_blocks, {% break %}/{% continue %}, and {% generation %} blocks, which render
    their body (transformers uses them to find assistant tokens; refimpl does not, see module docstring)."""
    jinja2 = import_jinja2()
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from None


def render(compiled, **variables) -> str:
    """compiled.render(...), with what goes wrong inside the template as a ChatTemplateError."""
    import jinja2

    try:
        return compiled.render(**variables)
    except RefimplError:
        raise  # raise_exception's ChatTemplateError
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError,
            RecursionError) as e:
        raise ChatTemplateError(f"the chat template failed while rendering: {type(e).__name__}: {e}") from None
