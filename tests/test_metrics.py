"""interformer.metrics against brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch

from interformer.metrics import auc, logloss


def brute_auc(scores, labels):
    """P(score of a positive > score of a negative) over all pairs, ties counting 1/2."""
    pos = [float(s) for s, y in zip(scores, labels) if y > 0.5]
    neg = [float(s) for s, y in zip(scores, labels) if y <= 0.5]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [3, 10, None])
def test_auc_matches_pairwise_count(seed, levels):
    g = torch.Generator().manual_seed(seed)
    n = 173
    labels = (torch.rand(n, generator=g) < 0.3).float()
    if levels is None:
        scores = torch.randn(n, generator=g) + labels  # continuous, informative
    else:
        scores = torch.randint(0, levels, (n,), generator=g).float() + 0.5 * labels  # many ties
    assert math.isclose(auc(scores, labels), brute_auc(scores, labels), rel_tol=0, abs_tol=1e-12)


def test_auc_edge_cases():
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert auc(torch.tensor([0.1, 0.9, 0.2, 0.8]), y) == 1.0
    assert auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), y) == 0.0
    assert auc(torch.full((4,), 0.3), y) == 0.5  # all tied
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))
    # invariant to any strictly increasing map of the scores
    s = torch.randn(50)
    lab = (torch.rand(50) < 0.5).float()
    assert math.isclose(auc(s, lab), auc(torch.sigmoid(3 * s), lab), abs_tol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_logloss_matches_formula(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(301, generator=g) * 4
    labels = (torch.rand(301, generator=g) < 0.4).float()
    expected = 0.0
    for z, y in zip(logits.double().tolist(), labels.tolist()):
        p = 1.0 / (1.0 + math.exp(-z))
        expected -= y * math.log(p) + (1 - y) * math.log(1 - p)
    expected /= len(logits)
    assert math.isclose(logloss(logits, labels), expected, rel_tol=1e-10)


def test_logloss_stable_for_large_logits():
    v = logloss(torch.tensor([200.0, -200.0]), torch.tensor([1.0, 0.0]))
    assert 0.0 <= v < 1e-12
    assert math.isclose(logloss(torch.tensor([200.0]), torch.tensor([0.0])), 200.0, rel_tol=1e-12)
