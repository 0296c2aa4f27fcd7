"""nsd_expdesign.mat -> trial table: index bases, edge trials, partial subjects, property tests."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nsd_fixtures as fx
from brainenc.datasets import layout
from brainenc.datasets.nsd import load_expdesign, trial_table
from brainenc.exceptions import ConfigError, DataFormatError

DESIGN = fx.make_design(seed=5)
_TABLES = {}


@pytest.fixture(scope="module")
def expdesign(tmp_path_factory):
    root = tmp_path_factory.mktemp("design")
    fx.write_expdesign(root, DESIGN)
    return load_expdesign(root)


def test_expdesign_fields_are_zero_based(expdesign):
    assert expdesign.masterordering.shape == (30000,)
    assert expdesign.subjectim.shape == (8, 10000)
    assert expdesign.sharedix.shape == (1000,)
    np.testing.assert_array_equal(expdesign.masterordering, DESIGN["masterordering"][0] - 1)
    np.testing.assert_array_equal(expdesign.subjectim, DESIGN["subjectim"] - 1)
    np.testing.assert_array_equal(expdesign.sharedix, DESIGN["sharedix"][0] - 1)
    # the edge 73k ids 1 and 73000 (1-based) become 0 and 72999
    assert expdesign.subjectim[0].min() == 0 and expdesign.subjectim[0].max() == 72999


@pytest.mark.parametrize("subject", ["subj01", "subj03", "subj04", "subj06", "subj08"])
def test_trial_table_first_and_last_trials(expdesign, subject):
    n = layout.N_SESSIONS[subject]
    tab = trial_table(expdesign, subject, n)
    s = int(subject[4:])
    assert tab.n_trials == 750 * n
    for t in (0, 749, 750, 750 * (n - 1), 750 * n - 1):
        assert tab.image_id[t] == fx.lookup(DESIGN, s, t)
        assert tab.global_trial[t] == t
    assert (tab.session[0], tab.trial[0]) == (1, 0)
    assert (tab.session[-1], tab.trial[-1]) == (n, 749)  # last trial of the last completed session
    assert tab.session_rows(n)[-1] == 750 * n - 1


def test_partial_subjects_see_fewer_repeats(expdesign):
    full = trial_table(expdesign, "subj01", 40)
    part = trial_table(expdesign, "subj04", 30)
    assert np.bincount(full.repeat).tolist() == [10000, 10000, 10000]
    counts = np.bincount(part.slot, minlength=10000)
    assert (counts <= 3).all() and part.repeat.max() == 2
    assert part.n_trials == 22500


@settings(max_examples=150, deadline=None)
@given(subject=st.integers(1, 8), data=st.data())
def test_trial_to_image_property(expdesign, subject, data):
    subj = f"subj{subject:02d}"
    n = layout.N_SESSIONS[subj]
    if subj not in _TABLES:
        _TABLES[subj] = trial_table(expdesign, subj, n)
    tab = _TABLES[subj]
    t = data.draw(st.integers(0, 750 * n - 1))
    k1 = int(DESIGN["masterordering"][0, t])
    assert tab.image_id[t] == int(DESIGN["subjectim"][subject - 1, k1 - 1]) - 1
    assert tab.slot[t] == k1 - 1
    assert tab.session[t] == t // 750 + 1 and tab.trial[t] == t % 750
    assert (tab.session[t] - 1) * 750 + tab.trial[t] == tab.global_trial[t]
    # repeat = number of earlier presentations of the same slot
    assert tab.repeat[t] == int((DESIGN["masterordering"][0, :t] == k1).sum())
    assert tab.shared[t] == (k1 <= 1000)


def test_trial_table_rejects_bad_session_counts(expdesign):
    with pytest.raises(DataFormatError, match="sessions"):
        trial_table(expdesign, "subj01", 41)
    with pytest.raises(DataFormatError, match="sessions"):
        trial_table(expdesign, "subj01", 0)
    with pytest.raises(ConfigError, match="subject"):
        trial_table(expdesign, "subj09", 3)


def test_missing_expdesign(tmp_path):
    with pytest.raises(DataFormatError, match="nsd_expdesign.mat: experimental design file not found"):
        load_expdesign(tmp_path)


def test_expdesign_wrong_shape(tmp_path):
    fx.write_expdesign(tmp_path, DESIGN, masterordering=DESIGN["masterordering"][:, :29999])
    with pytest.raises(DataFormatError, match=r"masterordering' must have shape \(1, 30000\); found \(1, 29999\)"):
        load_expdesign(tmp_path)


def test_expdesign_73k_id_out_of_range(tmp_path):
    bad = DESIGN["subjectim"].copy()
    bad[2, 5000] = 73001
    fx.write_expdesign(tmp_path, DESIGN, subjectim=bad)
    with pytest.raises(DataFormatError, match=r"subjectim' values must lie in \[1, 73000\].*found \[\d+, 73001\]"):
        load_expdesign(tmp_path)


def test_expdesign_zero_based_slot_is_rejected(tmp_path):
    bad = DESIGN["masterordering"].copy()
    bad[0, 7] = 0  # a 0-based file would contain 0
    fx.write_expdesign(tmp_path, DESIGN, masterordering=bad)
    with pytest.raises(DataFormatError, match="masterordering' values must lie in \\[1, 10000\\]"):
        load_expdesign(tmp_path)


def test_corrupt_expdesign(tmp_path):
    p = tmp_path / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataFormatError, match="nsd_expdesign.mat"):
        load_expdesign(p)
