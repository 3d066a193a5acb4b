"""Heads and losses shared by the three families, as transformers computes them.

Losses run in float32 at least (transformers upcasts logits with .float()), or float64 in audit mode. Labels and
positions arrive checked (refimpl/inputs.py: token_labels, sequence_labels, per_row_integers).
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .inputs import IGNORE_INDEX
from .ops import log_softmax


def cross_entropy(logits, targets, ignore_index=IGNORE_INDEX):
    """mean over kept rows of -log softmax(logits)[target]; rows whose target is ignore_index are dropped.

    logits [N, C], targets [N] in [0, C) or ignore_index. Every row ignored gives NaN (0/0), as torch does.
    """
    keep = targets != ignore_index
    logp = log_softmax(logits[keep])  # [N_kept, C]
    picked = logp[np.arange(logp.shape[0]), targets[keep]]
    with np.errstate(invalid="ignore"):
        return -np.sum(picked) / np.asarray(picked.shape[0], dtype=logits.dtype)


def causal_lm_loss(logits, labels):
    """Next-token loss: logits[:, :-1] predict labels[:, 1:] (ForCausalLMLoss, loss_utils.py:32-47). Labels are not
    pre-shifted; they are [B, S], like the logits' first two axes."""
    logits = logits.astype(np.promote_types(logits.dtype, np.float32))
    shifted = logits[:, :-1, :].reshape(-1, logits.shape[-1])  # [B*(S-1), V]
    targets = labels[:, 1:].reshape(-1)
    return cross_entropy(shifted, targets)


def pool_index(input_ids, pad_token_id, batch, seq_len, family):
    """Row index pooled by sequence classification: the token before the first pad (modeling_llama.py:1301-1314).

    No pad id: the last token (Llama and Open-Llama refuse batch > 1). With inputs_embeds: the last token.
    (argmax(ids == pad) - 1) % S also pools the last token of a left-padded row, and the token before the first
    pad *id* anywhere in the content: faithfully reproduced.
    """
    if pad_token_id is None and batch != 1 and family != "opt":
        raise InputError("sequence classification of a batch > 1 needs pad_token_id in config.json "
                         "(transformers raises here too)")
    if pad_token_id is None or input_ids is None:
        return np.full(batch, -1)
    first_pad = np.argmax(input_ids == pad_token_id, axis=-1)
    return (first_pad - 1) % seq_len


def problem_type_for(num_labels, labels):
    """transformers' choice when config.problem_type is unset: regression, single- or multi-label classification."""
    if num_labels == 1:
        return "regression"
    if np.issubdtype(labels.dtype, np.integer):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(pooled, labels, num_labels, problem_type):
    """MSE, cross-entropy or binary cross-entropy with logits, by problem_type (ForSequenceClassificationLoss)."""
    pooled = pooled.astype(np.promote_types(pooled.dtype, np.float32))
    if problem_type == "regression":
        labels = labels.astype(pooled.dtype)
        if num_labels == 1:
            return np.mean((np.squeeze(pooled) - np.squeeze(labels)) ** 2)
        return np.mean((pooled - labels) ** 2)
    if problem_type == "single_label_classification":
        return cross_entropy(pooled.reshape(-1, num_labels), labels.reshape(-1).astype(np.int64))
    # multi-label: mean of max(x, 0) - x y + log(1 + exp(-|x|))  (BCEWithLogitsLoss)
    labels = labels.astype(pooled.dtype)  # [B, num_labels], like the logits
    return np.mean(np.maximum(pooled, 0) - pooled * labels + np.log1p(np.exp(-np.abs(pooled))))


def question_answering_loss(start_logits, end_logits, start_positions, end_positions):
    """(CE(start) + CE(end)) / 2, positions [B] clamped to [0, S] and S ignored (modeling_opt.py:1450-1466)."""
    seq_len = start_logits.shape[1]
    start_positions = np.clip(start_positions, 0, seq_len)
    end_positions = np.clip(end_positions, 0, seq_len)
    dtype = np.promote_types(start_logits.dtype, np.float32)
    start_loss = cross_entropy(start_logits.astype(dtype), start_positions, ignore_index=seq_len)
    end_loss = cross_entropy(end_logits.astype(dtype), end_positions, ignore_index=seq_len)
    return (start_loss + end_loss) / 2
