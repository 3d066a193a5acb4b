"""Errors raised by refimpl.tokenizers.

Every error names the bad value or the bad file. Each one is a RefimplError (a ValueError); the one for
wrong types is also a TypeError. So a caller can catch it without knowing this package. Errors from the
libraries underneath (json, sentencepiece, UTF-8 codecs) are caught where they happen and re-raised as
one of these.
"""

from ..errors import RefimplError


class TokenizerFileError(RefimplError):
    """A tokenizer file is missing, unreadable or malformed, or a field has the wrong type. The message names the
    file, the field and a bounded summary of the bad value (files.summary)."""


class UnsupportedTokenizerError(TokenizerFileError):
    """The files describe a tokenizer (class, model type, pipeline component) that we do not implement."""


class InvalidTokenIdError(RefimplError):
    """An id passed to decode is outside the vocabulary (the message names the id and the valid range), or, with
    a GPT-2 tokenizer_config.json that says errors="strict", the ids decode to bytes that are not UTF-8."""


class InvalidTextError(RefimplError):
    """Text that cannot be tokenized: a lone surrogate cannot be written as UTF-8."""


class TokenizerUsageError(RefimplError):
    """An argument with a bad value: a padding mode, a padding side, a batch that cannot be padded as asked."""


class InputTypeError(RefimplError, TypeError):
    """Something that is not a string was given as text, or something that is not an int as an id."""


class StreamDecodeError(RefimplError):
    """Streamed text would differ from the full decode. Never expected: it means a bug in the streaming rules."""


class ChatTemplateError(RefimplError):
    """apply_chat_template could not render: no template (and no built-in default for this tokenizer), a named
    template that does not exist, a template with a syntax error or one that failed while rendering, the template's
    own raise_exception(message) (the message is in the error), or jinja2 not installed (pip install 'refimpl[chat]')."""
