"""clean_up_tokenization, and how much of a text a stream may clean up before the rest of it has arrived.

decode() may end with transformers' clean_up_tokenization (tokenization_utils_base.py:4052-4074): ten
str.replace calls, in order, that glue punctuation and contractions to the word before (" ." -> ".",
" n't" -> "n't"). A replacement can reach back over text a stream has already shown ("x n" + "'t"), so
a stream cleans up and shows only a prefix that no replacement can reach across (stable_length).
"""

from __future__ import annotations

# (before, after), applied in this order, each to the whole text
REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)

# The characters a pattern has before its last one: " ", "'", "n", "v", "r". Only a match that holds the
# text's last character *before its own last character* can continue into text that comes later.
REACHES_ON = frozenset(c for before, _ in REPLACEMENTS for c in before[:-1])


def clean_up_tokenization(text: str) -> str:
    """" ." -> ".", " n't" -> "n't", ... exactly as transformers' clean_up_tokenization."""
    for before, after in REPLACEMENTS:
        text = text.replace(before, after)
    return text


def stable_length(text: str) -> int:
    """The largest p with clean_up(text + more) == clean_up(text[:p]) + clean_up(text[p:] + more) for any more.

    Why text[:p] ending in a character c outside REACHES_ON is enough: every replacement only deletes spaces,
    so c stays the last character of text[:p] after each of the ten steps; a match that crossed the cut
    would hold c before its own last character, which no pattern has. str.replace scans left to right
    without overlaps, so with no match crossing, each step treats the two sides independently.
    """
    p = len(text)
    while p > 0 and text[p - 1] in REACHES_ON:
        p -= 1
    return p
