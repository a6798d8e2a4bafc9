"""interformer.metrics against brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch

from interformer.metrics import NO_GROUP, auc, gauc, logloss, normalized_entropy, scored_groups


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


@pytest.mark.parametrize("seed", range(4))
def test_scored_groups_counts_the_users_with_both_classes(seed):
    """``scored_groups`` against a per-user loop, and against gAUC: zero exactly when gAUC of finite
    scores is NaN (what the metrics report's note says)."""
    g = torch.Generator().manual_seed(seed)
    n = 60
    users = torch.randint(-3, 12, (n,), generator=g)
    users[torch.rand(n, generator=g) < 0.2] = NO_GROUP
    labels = (torch.rand(n, generator=g) < [0.05, 0.3, 0.5, 0.95][seed]).float()
    expected = sum(1 for u in set(users.tolist()) if u != NO_GROUP
                   and 0 < float(labels[users == u].sum()) < int((users == u).sum()))
    assert scored_groups(labels, users) == expected
    scores = torch.randn(n, generator=g)
    assert math.isnan(gauc(scores, labels, users)) == (expected == 0)
    # every user alone, or every label one class: none scored
    assert scored_groups(labels, torch.arange(n)) == 0
    assert scored_groups(torch.zeros(n), users) == 0
    with pytest.raises(ValueError, match="same length"):
        scored_groups(labels, users[1:])


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


# --- against scikit-learn on random data -----------------------------------------------------
import sklearn.metrics as sklearn_metrics  # noqa: E402  (installed by `make test`; its absence is a failure, not a skip)


def _random_ctr(seed, n=997, n_users=40, ties=False):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.25).float()
    logits = torch.randn(n, generator=g) * 2 + 1.5 * labels
    if ties:
        logits = torch.round(logits)
    users = torch.randint(0, n_users, (n,), generator=g) * 7919 + 3  # arbitrary int64 keys
    return logits, labels, users


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_logloss_match_sklearn(seed, ties):
    logits, labels, _ = _random_ctr(seed, ties=ties)
    p = torch.sigmoid(logits.double()).numpy()
    assert math.isclose(auc(logits, labels), sklearn_metrics.roc_auc_score(labels.numpy(), p), abs_tol=1e-12)
    assert math.isclose(logloss(logits, labels), sklearn_metrics.log_loss(labels.numpy(), p), rel_tol=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_gauc_matches_sklearn_per_user(seed, ties):
    logits, labels, users = _random_ctr(seed, ties=ties)
    total = weight = 0.0
    for u in torch.unique(users).tolist():
        sel = users == u
        y = labels[sel].double().numpy()
        if 0 < y.sum() < len(y):  # users with one class have no AUC and are skipped
            total += float(y.sum()) * float(sklearn_metrics.roc_auc_score(y, logits[sel].double().numpy()))
            weight += float(y.sum())
    assert weight > 0
    assert math.isclose(gauc(logits, labels, users), total / weight, abs_tol=1e-12)


def test_gauc_edge_cases():
    y = torch.tensor([1.0, 0.0, 1.0, 1.0])
    s = torch.tensor([0.9, 0.1, 0.2, 0.3])
    # user 5 has one class only and is skipped; user 1 is perfectly ranked
    assert gauc(s, y, torch.tensor([1, 1, 5, 5])) == 1.0
    # clicks weight the users: user 1 (1 click, AUC 1), user 2 (2 clicks, AUC 0)
    y2 = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    s2 = torch.tensor([0.9, 0.1, 0.1, 0.2, 0.8])
    assert math.isclose(gauc(s2, y2, torch.tensor([1, 1, 2, 2, 2])), 1.0 / 3.0, abs_tol=1e-15)
    assert math.isnan(gauc(s, torch.ones(4), torch.tensor([1, 1, 2, 2])))
    with pytest.raises(ValueError, match="same length"):
        gauc(s, y, torch.tensor([1, 2]))


def test_gauc_leaves_out_samples_without_a_group():
    """Group -1 (no user id): those samples are no group of their own and count nowhere; here as a
    group they would have AUC 0 and 2 of the 3 clicks' weight."""
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    s = torch.tensor([0.9, 0.1, 0.1, 0.2, 0.8])
    assert gauc(s, y, torch.tensor([1, 1, -1, -1, -1])) == 1.0
    assert math.isclose(gauc(s, y, torch.tensor([1, 1, 7, 7, 7])), 1.0 / 3.0, abs_tol=1e-15)
    assert math.isnan(gauc(s, y, torch.full((5,), -1)))
    # other negative ids (signed 64-bit hashes, say) are groups like any
    assert math.isclose(gauc(s, y, torch.tensor([1, 1, -7, -7, -7])), 1.0 / 3.0, abs_tol=1e-15)
    # and so is an unsigned dtype's largest id: uint8's 255 compared with -1 wrapped to it, and its
    # samples were left out as ungrouped (a review's find, 2026-11-29)
    for dtype in (torch.uint8, torch.int16, torch.int64):
        ids = torch.tensor([1, 1, 255, 255, 255], dtype=dtype)
        assert math.isclose(gauc(s, y, ids), 1.0 / 3.0, abs_tol=1e-15), dtype
        assert scored_groups(y, ids) == 2, dtype


@pytest.mark.parametrize("seed", range(3))
def test_normalized_entropy_matches_sklearn(seed):
    logits, labels, _ = _random_ctr(seed)
    y = labels.numpy()
    p = torch.sigmoid(logits.double()).numpy()
    base_rate = y.mean()
    baseline = sklearn_metrics.log_loss(y, [base_rate] * len(y))  # entropy of the click rate
    assert math.isclose(normalized_entropy(logits, labels), sklearn_metrics.log_loss(y, p) / baseline, rel_tol=1e-9)
    # predicting the base rate everywhere scores exactly 1
    const = torch.full_like(logits, math.log(base_rate / (1 - base_rate)))
    assert math.isclose(normalized_entropy(const, labels), 1.0, rel_tol=1e-9)
    assert math.isnan(normalized_entropy(logits, torch.zeros_like(labels)))



def test_nan_or_inf_scores_give_nan_not_a_plausible_auc():
    """A diverged model's NaN logits: AUC and gAUC are NaN (ranking NaNs gave 0.75 for all-NaN scores)."""
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    for scores in (torch.full((4,), float("nan")), torch.tensor([float("nan"), 0.1, 0.3, 0.2]),
                   torch.tensor([0.1, float("inf"), 0.3, 0.2])):
        assert math.isnan(auc(scores, labels))
        assert math.isnan(gauc(scores, labels, torch.tensor([0, 0, 0, 0])))


def test_auc_refuses_labels_other_than_0_and_1_and_a_length_mismatch():
    """A NaN label used to count as a negative and a 2 as a positive; a length mismatch raised an
    IndexError from the ranking. Both are ValueErrors now, in auc as in gauc; NaN scores and one
    class still give NaN."""
    s = torch.tensor([0.1, 0.9, 0.2, 0.8])
    for bad in (2.0, float("nan"), -1.0, 0.5, float("inf")):
        labels = torch.tensor([0.0, 1.0, bad, 1.0])
        with pytest.raises(ValueError, match="labels must be 0 or 1"):
            auc(s, labels)
        with pytest.raises(ValueError, match="labels must be 0 or 1"):
            gauc(s, labels, torch.tensor([1, 1, 2, 2]))
    with pytest.raises(ValueError, match="same length"):
        auc(s, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="same length"):
        auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="same length"):  # the lengths are checked before the scores
        gauc(torch.full((4,), float("nan")), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1, 1, 2, 2]))
    # 0/1 in any dtype is accepted and gives the same AUC
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    for labels in (y, y.long(), y.bool(), y.half()):
        assert auc(s, labels) == 1.0
    assert math.isnan(auc(torch.tensor([float("nan"), 0.9, 0.2, 0.8]), y))
    assert math.isnan(auc(s, torch.zeros(4)))


def test_logloss_and_normalized_entropy_refuse_bad_labels_and_take_any_shape():
    """auc and gauc refused a label such as -1, 2 or NaN, but logloss and NE took it: -1/+1 labels
    gave a plausible LogLoss (a negative-weighted cross-entropy) and NE; logits [B, 1] against
    labels [B] (which auc takes flat) failed in torch with "Target size ... must be the same as
    input size". Both now check as auc does."""
    s = torch.tensor([0.9, -0.1, 0.2, 1.3])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    for bad in (2.0, -1.0, float("nan"), 0.5):
        labels = y.clone()
        labels[1] = bad
        with pytest.raises(ValueError, match="logloss: labels must be 0 or 1"):
            logloss(s, labels)
        with pytest.raises(ValueError, match="normalized_entropy: labels must be 0 or 1"):
            normalized_entropy(s, labels)
    for f in (logloss, normalized_entropy):
        with pytest.raises(ValueError, match="same length"):
            f(s, y[:3])
        with pytest.raises(ValueError, match="same length"):
            f(s, y[:1])  # no broadcasting of one label over every logit
        expected = f(s, y)
        for logits, labels in ((s[:, None], y), (s, y[:, None]), (s.half(), y.bool()), (s, y.long())):
            assert math.isclose(f(logits, labels), expected, rel_tol=1e-3 if logits.dtype == torch.half else 1e-15)
    assert math.isnan(logloss(torch.tensor([]), torch.tensor([])))
    assert math.isnan(normalized_entropy(torch.tensor([]), torch.tensor([])))


def _gauc_by_definition(scores, labels, users) -> float:
    """Per-user sklearn AUC weighted by the user's clicks; users of one class and NO_GROUP left out."""
    from interformer.metrics import NO_GROUP

    total = weight = 0.0
    for u in torch.unique(users).tolist():
        if u == NO_GROUP:
            continue
        sel = users == u
        y = labels[sel].numpy()
        if 0 < y.sum() < len(y):
            total += float(y.sum()) * sklearn_metrics.roc_auc_score(y, scores[sel].double().numpy())
            weight += float(y.sum())
    return total / weight


@pytest.mark.parametrize("seed", range(6))
def test_gauc_against_its_definition_with_ties_odd_ids_and_low_precision_scores(seed):
    """Per-user sklearn AUC weighted by the user's clicks, users of one class and samples of
    NO_GROUP left out; ids at both ends of int64 and negative ones; tied scores, fp16/bf16 scores,
    labels as bool, int or float."""
    from interformer.metrics import NO_GROUP

    g = torch.Generator().manual_seed(seed)
    n = 600
    ids = torch.tensor([NO_GROUP, 2**63 - 1, -2**63, -2, 0, 1, 2**62, 12345])
    users = ids[torch.randint(0, len(ids), (n,), generator=g)]
    labels = torch.rand(n, generator=g) < 0.35
    scores = (torch.randint(0, 6, (n,), generator=g).float() + labels.float()) * (0.37 if seed % 2 else 1.0)
    dtype = (torch.float32, torch.float16, torch.bfloat16)[seed % 3]
    scores = scores.to(dtype)
    want = _gauc_by_definition(scores, labels, users)
    for lab in (labels, labels.long(), labels.float()):
        assert math.isclose(gauc(scores, lab, users), want, abs_tol=1e-12)
    # all users of one class, or every sample without a user: NaN
    assert math.isnan(gauc(scores, torch.ones(n), users))
    assert math.isnan(gauc(scores, labels, torch.full((n,), NO_GROUP)))
    # one group holding every sample: the AUC
    assert math.isclose(gauc(scores, labels, torch.full((n,), 7)), auc(scores, labels), abs_tol=1e-15)
    # many small groups (every group's AUC is formed at once, each group's ranks restarting at 1)
    many = torch.randint(0, 150, (n,), generator=g)
    assert math.isclose(gauc(scores, labels, many), _gauc_by_definition(scores, labels, many), abs_tol=1e-12)


def test_an_infinite_logit_costs_its_limit():
    """``-log sigmoid(+inf)`` is 0 and ``-log(1 - sigmoid(+inf))`` is inf (and the mirror for
    ``-inf``): logloss and Normalized Entropy give those limits. BCE-with-logits' one formula,
    ``max(z, 0) - z y + log1p(exp(-|z|))``, gave ``inf - inf`` = NaN for ``+inf`` with a click."""
    inf = float("inf")
    right = (torch.tensor([inf, -inf, 3.0, -2.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    finite = (right[0][2:], right[1][2:])
    assert math.isclose(logloss(*right), logloss(*finite) / 2, rel_tol=1e-15)
    assert logloss(torch.tensor([inf, 0.0]), torch.tensor([0.0, 1.0])) == inf
    assert logloss(torch.tensor([-inf, 0.0]), torch.tensor([1.0, 0.0])) == inf
    assert math.isnan(logloss(torch.tensor([float("nan"), 0.0]), torch.tensor([1.0, 0.0])))
    assert math.isclose(normalized_entropy(*right), logloss(*right) / math.log(2), rel_tol=1e-15)
