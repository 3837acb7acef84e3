import numpy as np
import pytest

from boltzflow.errors import InputError
from boltzflow.sampling import SampleSet


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    s = SampleSet(rng.normal(size=(5, 4, 3)).astype(np.float32), rng.normal(size=5), rng.normal(size=5),
                  rng.normal(size=5), 300.0, {"sampler": "test"})
    p = s.save(tmp_path / "s.npz")
    t = SampleSet.load(p)
    np.testing.assert_array_equal(t.positions, s.positions)
    np.testing.assert_array_equal(t.log_weights, s.log_weights)
    assert t.temperature == 300.0 and t.provenance == {"sampler": "test"}
    assert len(t.subset(np.array([0, 2]))) == 2
    assert len(SampleSet.concatenate([s, t])) == 10


def test_normalized_weights_ignore_nonfinite():
    s = SampleSet(np.zeros((3, 2)), log_weights=np.array([0.0, np.log(3.0), -np.inf]))
    np.testing.assert_allclose(s.normalized_weights(), [0.25, 0.75, 0.0])
    u = SampleSet(np.zeros((4, 2)))
    np.testing.assert_allclose(u.normalized_weights(), 0.25)


def test_bad_shapes_and_files(tmp_path):
    with pytest.raises(InputError):
        SampleSet(np.zeros(3))
    with pytest.raises(InputError, match="shape"):
        SampleSet(np.zeros((3, 2)), reduced_energy=np.zeros(4))
    with pytest.raises(InputError, match="not found"):
        SampleSet.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(InputError, match="readable"):
        SampleSet.load(tmp_path / "junk.npz")


def test_provenance_is_versioned_and_old_keys_are_mapped(tmp_path):
    import json

    from boltzflow.core.sampleset import PROVENANCE_VERSION

    p = SampleSet(np.zeros((2, 3)), provenance={"energy_evals": 7, "wall_s": 1.5}).save(tmp_path / "new.npz")
    with np.load(p) as z:
        assert json.loads(str(z["meta_json"]))["provenance_version"] == PROVENANCE_VERSION == 2
    assert SampleSet.load(p).provenance == {"energy_evals": 7, "wall_s": 1.5}
    # a version-1 file (no version): every old spelling maps onto the one key; a new key already there wins
    old = {"energy_evaluations": 10, "wall_time_s": 2.0, "training_energy_evaluations": 30,
           "train_wall_s": 4.0, "sampler": "replica-exchange"}
    meta = {"format": "boltzflow-sampleset/1", "temperature": 300.0, "provenance": old}
    np.savez(tmp_path / "v1.npz", positions=np.zeros((2, 3)), meta_json=np.array(json.dumps(meta)))
    assert SampleSet.load(tmp_path / "v1.npz").provenance == {
        "sampler": "replica-exchange", "energy_evals": 10, "wall_s": 2.0, "training_energy_evals": 30,
        "training_wall_s": 4.0}
    meta["provenance"] = {"energy_evals": 1, "energy_evaluations": 2}
    np.savez(tmp_path / "both.npz", positions=np.zeros((2, 3)), meta_json=np.array(json.dumps(meta)))
    assert SampleSet.load(tmp_path / "both.npz").provenance == {"energy_evals": 1}


def test_check_finite_ignores_frames_without_weight():
    x = np.zeros((4, 2))
    x[1, 0] = np.nan
    with pytest.raises(InputError, match="1 of 4 frames"):
        SampleSet(x).check_finite()
    lw = np.array([0.0, -np.inf, 0.0, 0.0])  # the NaN frame has no weight: harmless for reweighting
    assert SampleSet(x, log_weights=lw).check_finite() is not None
    with pytest.raises(InputError, match="frame 1"):
        SampleSet(x, log_weights=np.zeros(4)).check_finite()
