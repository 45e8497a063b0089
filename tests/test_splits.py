"""splits.py: splits by study, deterministic, disjoint, complete."""

import pytest

from keras_cspine.data.splits import split_studies


@pytest.mark.parametrize("n, val, test", [(10, 0.2, 0.1), (3, 0.3, 0.0), (50, 0.1, 0.2), (2, 0.5, 0.0)])
def test_disjoint_complete_and_deterministic(n, val, test):
    uids = [f"1.2.{i}" for i in range(n)] * 3  # slices repeat their study uid
    a = split_studies(uids, val, test, seed=1)
    assert a == split_studies(list(reversed(uids)), val, test, seed=1)
    parts = [set(a["train"]), set(a["val"]), set(a["test"])]
    assert set().union(*parts) == set(uids)
    assert sum(len(p) for p in parts) == n
    if val:
        assert a["val"], "a requested validation split must not be empty"
    assert a["train"]


def test_seed_changes_the_split():
    uids = [f"1.2.{i}" for i in range(40)]
    assert split_studies(uids, 0.25, seed=0)["val"] != split_studies(uids, 0.25, seed=1)["val"]


@pytest.mark.parametrize("val, test", [(-0.1, 0.0), (1.0, 0.0), (0.6, 0.5)])
def test_illegal_fractions(val, test):
    with pytest.raises(ValueError, match="fraction"):
        split_studies(["1.2.3"], val, test)
