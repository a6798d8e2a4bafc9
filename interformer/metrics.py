"""Offline CTR metrics: AUC (ties averaged), gAUC, LogLoss and Normalized Entropy."""

from __future__ import annotations

import math

import torch

#: the group id of a sample that belongs to no group (``gauc`` leaves it out): what the data readers
#: (:mod:`interformer.dataio`) give a sample without a user id
NO_GROUP = -1


def _binary_labels(name: str, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` (flattened, on the CPU) as a bool tensor; ValueError unless every label is 0 or 1.

    A NaN label would otherwise count as a negative and a 2 as a positive, without a word."""
    labels = labels.detach().flatten().cpu()
    if labels.dtype == torch.bool:
        return labels
    bad = (labels != 0) & (labels != 1)  # NaN compares unequal to both
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}: labels must be 0 or 1, got {labels[i].item()!r} at index {i} "
                         f"({int(bad.sum())} such label(s))")
    return labels == 1


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the rank-sum formula, tied scores sharing their average rank.

    ``labels`` must be 0 or 1 (any dtype) and as many as ``scores``; anything else (a length
    mismatch, a label such as 2 or NaN) raises ValueError. Returns NaN when only one class is
    present, or when any score is NaN or infinite (a diverged model: ranking NaNs would give a
    plausible-looking number).
    """
    scores = scores.detach().double().flatten().cpu()
    if scores.numel() != labels.numel():
        raise ValueError(f"auc: scores and labels must have the same length, got {scores.numel()} and "
                         f"{labels.numel()}")
    labels = _binary_labels("auc", labels)
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0 or not bool(torch.isfinite(scores).all()):
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average the ranks of ties
    uniq, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _logits_and_labels(name: str, logits: torch.Tensor, labels: torch.Tensor):
    """``logits`` flattened as float64 on the CPU and ``labels`` as bool (:func:`_binary_labels`);
    ValueError unless they are equally many."""
    logits = logits.detach().double().flatten().cpu()
    if logits.numel() != labels.numel():
        raise ValueError(f"{name}: logits and labels must have the same length, got {logits.numel()} and "
                         f"{labels.numel()}")
    return logits, _binary_labels(name, labels)


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean of ``-log sigmoid(z)`` over the clicked samples and ``-log(1 - sigmoid(z))`` over
    the others, as ``softplus(s) = max(s, 0) + log1p(exp(-|s|))`` of ``s = -z`` and ``s = z``: an
    infinite logit costs its limit, 0 on the side of its label and inf on the other, where the
    usual ``max(z, 0) - z y + log1p(exp(-|z|))`` gives ``inf - inf`` = NaN for ``+inf`` with a click.
    (``torch``'s ``softplus`` returns ``s`` itself past 20, dropping up to 2e-9 a sample.)"""
    s = torch.where(labels, -logits, logits)
    return float((s.clamp(min=0) + torch.log1p(torch.exp(-s.abs()))).mean())


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against ``labels``.

    As in :func:`auc`, labels must be 0 or 1 (any dtype) and as many as ``logits`` (any shape, taken
    flat): anything else raises ValueError (a label of -1 or 2 would otherwise give a plausible,
    negative-weighted number). NaN logits give NaN; no samples give NaN. An infinite logit costs
    its limit: 0 on the side of its label, inf on the other.
    """
    return _mean_cross_entropy(*_logits_and_labels("logloss", logits, labels))


def gauc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """Group AUC: the AUC of each group (user), averaged with the group's click count as weight.

    Groups whose samples are all of one class have no AUC and are skipped (their clicks do not
    count in the weights either); so are samples whose group is -1 (:data:`NO_GROUP`: no group,
    what the data readers give a sample without a user id). Other negative ids are groups like any. Returns NaN when no group has both classes, or when any score is
    NaN or infinite. Labels must be 0 or 1 and the three inputs equally long (ValueError), as in
    :func:`auc`.
    """
    scores = scores.detach().double().flatten().cpu()
    groups = _group_ids(groups)
    if not (scores.numel() == labels.numel() == groups.numel()):
        raise ValueError(f"gauc: scores, labels and groups must have the same length, got "
                         f"{scores.numel()}, {labels.numel()}, {groups.numel()}")
    labels = _binary_labels("gauc", labels)
    if not bool(torch.isfinite(scores).all()):
        return float("nan")
    grouped = groups != NO_GROUP
    if not bool(grouped.all()):
        scores, labels, groups = scores[grouped], labels[grouped], groups[grouped]
    n = scores.numel()
    if n == 0:
        return float("nan")
    # Every group's AUC by the rank-sum formula at once (a Python loop over groups took tens of
    # seconds for a million users): order by (group, score), rank within the group, ties sharing
    # their average rank, and sum per group.
    by_score = torch.argsort(scores, stable=True)
    order = by_score[torch.argsort(groups[by_score], stable=True)]
    g, s, y = groups[order], scores[order], labels[order]
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.clone()  # a run: equal scores within a group
    new_run[1:] |= s[1:] != s[:-1]
    pos = torch.arange(n, dtype=torch.float64)
    group_of = torch.cumsum(new_group, 0) - 1
    run_of = torch.cumsum(new_run, 0) - 1
    group_start = pos[new_group]
    run_start = pos[new_run]
    run_end = torch.cat([run_start[1:], torch.tensor([float(n)], dtype=torch.float64)]) - 1
    # 1-based rank within the group, averaged over the run
    run_rank = (run_start + run_end) / 2 - group_start[group_of[new_run]] + 1
    ranks = run_rank[run_of]
    n_groups = group_start.numel()
    size = torch.bincount(group_of, minlength=n_groups).double()
    clicks = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_of, y.double())
    pos_rank_sum = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_of, torch.where(y, ranks, 0.0))
    both = (clicks > 0) & (clicks < size)
    if not bool(both.any()):
        return float("nan")
    clicks, size, pos_rank_sum = clicks[both], size[both], pos_rank_sum[both]
    group_auc = (pos_rank_sum - clicks * (clicks + 1) / 2) / (clicks * (size - clicks))
    return float((clicks * group_auc).sum() / clicks.sum())


def _group_ids(groups: torch.Tensor) -> torch.Tensor:
    """Group ids flattened on the CPU, integer ones as int64: in an unsigned dtype ``!= NO_GROUP``
    compared with -1 wrapped to the dtype's largest value (uint8: 255), so that group was dropped
    as "no group" (a review's find, 2026-11-29)."""
    groups = groups.detach().flatten().cpu()
    return groups if groups.is_floating_point() else groups.long()


def scored_groups(labels: torch.Tensor, groups: torch.Tensor) -> int:
    """How many groups :func:`gauc` scores: those (other than :data:`NO_GROUP`) holding both a click
    and a non-click. Zero is why gAUC is NaN on finite scores, which a metrics report can say."""
    labels = _binary_labels("scored_groups", labels).flatten()
    groups = _group_ids(groups)
    if labels.numel() != groups.numel():
        raise ValueError(f"scored_groups: labels and groups must have the same length, got {labels.numel()}, "
                         f"{groups.numel()}")
    grouped = groups != NO_GROUP
    clicked = torch.unique(groups[grouped & labels])
    unclicked = torch.unique(groups[grouped & ~labels])
    return int(torch.isin(clicked, unclicked).sum())


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Normalized Entropy (He et al., 2014): LogLoss divided by the entropy of the empirical click rate.

    Below 1 means the model beats always predicting the average click rate. Returns NaN when the
    labels hold one class only (the baseline entropy is 0) or there are none. Labels must be 0 or 1
    and as many as ``logits`` (ValueError), as in :func:`logloss`.
    """
    logits, labels = _logits_and_labels("normalized_entropy", logits, labels)
    if labels.numel() == 0:
        return float("nan")
    p = float(labels.double().mean())
    if p <= 0.0 or p >= 1.0:
        return float("nan")
    base = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return _mean_cross_entropy(logits, labels) / base
