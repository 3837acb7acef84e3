"""Replica exchange on cheap systems with exact answers (real OpenMM + openmmtools)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from boltzflow.errors import ConfigError, InputError
from boltzflow.estimators import bar_free_energy, exp_free_energy
from boltzflow.replica import ReplicaExchangeConfig, extract_samples, mbar_analysis, read_replica, run_replica_exchange
from boltzflow.replica.energies import reduced_energies
from boltzflow.replica.toy import harmonic_reduced_free_energy, harmonic_system
from boltzflow.sampling import SampleSet

N_PART = 5
FAST = dict(t_min=300.0, t_max=600.0, n_replicas=4, steps_per_iteration=100, timestep_fs=1.0,
            collision_rate_per_ps=20.0, platform="Reference")


@pytest.fixture(scope="module")
def harmonic_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("harmonic_pt")
    system = harmonic_system(N_PART)
    cfg = ReplicaExchangeConfig(n_iterations=200, **FAST)
    path = run_replica_exchange(system, cfg, d, progress=False)
    return system, cfg, path


def test_extract_samples_is_a_readable_sampleset(harmonic_run, tmp_path):
    system, cfg, path = harmonic_run
    ss = extract_samples(path, state_index=0)
    assert ss.positions.shape[1:] == (N_PART, 3) and len(ss) > 20
    assert ss.temperature == pytest.approx(300.0)
    assert ss.log_q is None and ss.log_weights is None
    g = ss.provenance["statistical_inefficiency"]
    assert g >= 1.0 and ss.provenance["n_iterations"] == 200
    assert ss.provenance["energy_evals"] == 200 * 4 * 100
    # stored reduced energies are U/kT of the stored positions (positions float32 -> loose tolerance)
    u = reduced_energies(system, ss.positions[:20], 300.0, platform="Reference")
    np.testing.assert_allclose(ss.reduced_energy[:20], u, rtol=1e-4, atol=1e-4)
    # equipartition: <u> = 3N/2 at every temperature (harmonic)
    assert np.mean(ss.reduced_energy) == pytest.approx(1.5 * N_PART, abs=4 * np.std(ss.reduced_energy) / np.sqrt(len(ss)))
    p = ss.save(tmp_path / "s.npz")
    back = SampleSet.load(p)
    np.testing.assert_array_equal(back.positions, ss.positions)
    assert back.provenance["statistical_inefficiency"] == pytest.approx(g)
    hot = extract_samples(path, state_index=3)
    assert hot.temperature == pytest.approx(600.0)
    with pytest.raises(InputError):
        extract_samples(path, state_index=4)


def test_mbar_free_energies_match_exact_and_exp_bar(harmonic_run):
    system, cfg, path = harmonic_run
    res = mbar_analysis(path)
    temps = cfg.temperatures()
    np.testing.assert_allclose(res.temperatures, temps)
    exact = np.array([harmonic_reduced_free_energy(N_PART, temps[0], t) for t in temps])
    err = np.maximum(res.free_energy_errors, 0.02)
    # honest-ish: within 4 MBAR sigma plus a little for correlation
    assert np.all(np.abs(res.free_energies - exact) < 4 * err + 0.05), (res.free_energies, exact, err)
    # EXP and BAR between the two lowest temperatures from the state-0 and state-1 sample sets
    s0, s1 = extract_samples(path, 0), extract_samples(path, 1)
    r = temps[0] / temps[1]  # u_1(x) = u_0(x) * T0 / T1 for the same potential
    w_f = s0.reduced_energy * r - s0.reduced_energy
    w_r = s1.reduced_energy / r - s1.reduced_energy
    exp = exp_free_energy(w_f)
    bar = bar_free_energy(w_f, w_r)
    for est in (exp, bar):
        assert abs(est.value - res.free_energies[1]) < 4 * np.hypot(est.stderr, res.free_energy_errors[1]) + 0.05
        assert abs(est.value - exact[1]) < 4 * est.stderr + 0.05


def test_mbar_observables_have_block_errors(harmonic_run):
    system, cfg, path = harmonic_run
    res = mbar_analysis(path, {"x>0": lambda x: x[:, 0, 0] > 0.0}, n_blocks=5)
    est = res.observables["x>0"]
    # openmmtools draws Langevin noise unseeded and this run is short: tolerate its rare excursions
    assert est.value == pytest.approx(0.5, abs=max(5 * est.stderr, 0.15))
    assert est.stderr > 0 and est.extra["stderr_block"] > 0 and est.extra["stderr_mbar"] > 0
    assert est.ci_low <= est.value <= est.ci_high


def test_resume_extends_and_rejects_mismatch(tmp_path):
    system = harmonic_system(2)
    cfg = ReplicaExchangeConfig(n_iterations=6, checkpoint_interval=2, **{**FAST, "steps_per_iteration": 20})
    path = run_replica_exchange(system, cfg, tmp_path, progress=False)
    assert read_replica(path).n_iterations == 6
    with pytest.raises(InputError, match="already exists"):
        run_replica_exchange(system, cfg, tmp_path, resume=False, progress=False)
    with pytest.raises(InputError, match="n_replicas"):
        run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=8, **{**FAST, "n_replicas": 3,
                                                                             "steps_per_iteration": 20}),
                             tmp_path, progress=False)
    cfg2 = ReplicaExchangeConfig(n_iterations=10, checkpoint_interval=2, **{**FAST, "steps_per_iteration": 20})
    run_replica_exchange(system, cfg2, tmp_path, progress=False)
    data = read_replica(path)
    assert data.n_iterations == 10
    assert np.all(np.sort(data.states, axis=1) == np.arange(4))  # a permutation of states every iteration
    cost = json.loads((tmp_path / "replica_cost.json").read_text())
    assert cost["iteration"] == 10 and cost["wall_time_s"] > 0


def test_config_validation():
    with pytest.raises(ConfigError):
        ReplicaExchangeConfig(method="annealing")
    with pytest.raises(ConfigError):
        ReplicaExchangeConfig(t_min=400, t_max=300)
    np.testing.assert_allclose(ReplicaExchangeConfig(t_min=300, t_max=700, n_replicas=8).temperatures()[[0, -1]],
                               [300, 700])
    t = ReplicaExchangeConfig(t_min=300, t_max=700, n_replicas=8).temperatures()
    np.testing.assert_allclose(t[1:] / t[:-1], (700 / 300) ** (1 / 7))


def test_resume_after_kill(tmp_path):
    """A `boltzflow simulate` process killed with SIGKILL mid-run resumes from its last checkpoint."""
    sysdir = tmp_path / "sys"
    harmonic_system(2).save(sysdir)
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from boltzflow.cli import entry; entry()", "simulate", str(sysdir), "--t-min", "300", "--t-max", "600",
           "--replicas", "3", "--steps-per-iteration", "20", "--platform", "Reference", "--checkpoint-interval", "5",
           "--no-progress", "-o", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd + ["--iterations", "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cost = run / "replica_cost.json"
    t0 = time.time()
    try:
        while time.time() - t0 < 120:
            if cost.is_file() and json.loads(cost.read_text()).get("iteration", 0) >= 10:
                break
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode())
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    done = json.loads(cost.read_text())["iteration"]
    assert done >= 10
    target = done + 7
    r = subprocess.run(cmd + ["--iterations", str(target), "--resume"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    data = read_replica(run)
    assert data.n_iterations == target
    assert np.all(np.isfinite(data.energies))
    ss = SampleSet.load(run / "samples.npz")
    assert ss.provenance["n_iterations"] == target


def test_replica_exchange_method_over_explicit_states(tmp_path):
    system = harmonic_system(2)
    cfg = ReplicaExchangeConfig(method="replica-exchange", n_iterations=5,
                                **{**FAST, "n_replicas": 3, "steps_per_iteration": 20})
    path = run_replica_exchange(system, cfg, tmp_path, progress=False)
    data = read_replica(path)
    assert data.energies.shape == (5, 3, 3)
    np.testing.assert_allclose(data.temperatures, cfg.temperatures())
    # reduced energies of one configuration scale as 1/T across states
    e = data.energies[-1, 0]
    np.testing.assert_allclose(e * data.temperatures, e[0] * data.temperatures[0], rtol=1e-6)


def test_resume_accepts_reserialised_system_but_not_another_one(tmp_path):
    import dataclasses

    import openmm

    system = harmonic_system(2)
    cfg = ReplicaExchangeConfig(n_iterations=3, **{**FAST, "n_replicas": 2, "steps_per_iteration": 10})
    run_replica_exchange(system, cfg, tmp_path, progress=False)
    same = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system.system))
    same.addForce(openmm.CustomExternalForce("0"))  # new XML, same energies
    twin = dataclasses.replace(system, system=same)
    assert twin.fingerprint() != system.fingerprint()
    run_replica_exchange(twin, dataclasses.replace(cfg, n_iterations=4), tmp_path, progress=False)
    assert read_replica(tmp_path).n_iterations == 4
    other = harmonic_system(2, k_kj_mol_nm2=150.0)
    with pytest.raises(InputError, match="energies differ"):
        run_replica_exchange(other, dataclasses.replace(cfg, n_iterations=5), tmp_path, progress=False)


def test_cold_state_is_not_heated_by_swapped_velocities(tmp_path):
    # Weak friction (1/ps) and short iterations (0.1 ps): if velocities are kept across swaps, a
    # configuration arriving at 300 K from a hotter replica brings its hot velocities along and the
    # 300 K state samples too hot (<u> ~ 18.4 instead of the exact 15 for 10 oscillators). With
    # velocities reassigned every iteration <u> at every state is exactly 3N/2 (equipartition).
    from boltzflow.replica.exchange import _make_sampler

    n = 10
    cfg = ReplicaExchangeConfig(n_iterations=500, **{**FAST, "collision_rate_per_ps": 1.0})
    assert _make_sampler(cfg).mcmc_moves.reassign_velocities
    path = run_replica_exchange(harmonic_system(n), cfg, tmp_path, progress=False)
    ss = extract_samples(path, state_index=0, decorrelate=False)
    u = ss.reduced_energy
    g = ss.provenance["statistical_inefficiency"]
    se = np.std(u) / np.sqrt(len(u) / g)
    assert abs(np.mean(u) - 1.5 * n) < max(4 * se, 1.0), (np.mean(u), se)


SMALL = {**FAST, "n_replicas": 3, "steps_per_iteration": 20}


def _zlib_chunks(data: bytes) -> list[tuple[int, int]]:
    """(address, size) of the stored chunks that are zlib streams (openmmtools compresses positions
    and velocities; velocities stay unwritten), in iteration order, read from the leaf nodes ("TREE",
    type 1 = chunk index, level 0) of the HDF5 v1 B-trees: after the 24-byte node header come
    ``used`` entries of (key: chunk size u32, filter mask u32, rank+1 offsets u64; chunk address u64)."""
    import struct
    import zlib

    out = []
    i = data.find(b"TREE")
    while i >= 0:
        if data[i + 4] == 1 and data[i + 5] == 0:
            used = struct.unpack_from("<H", data, i + 6)[0]
            for rank in range(1, 8):  # the key size depends on the dataset's rank: try them all
                ks = 8 + 8 * (rank + 1)
                try:
                    entries = [(struct.unpack_from("<Q", data, o + ks)[0], struct.unpack_from("<I", data, o)[0])
                               for o in (i + 24 + k * (ks + 8) for k in range(used))]
                    if all(zlib.decompress(data[a:a + n]) for a, n in entries):
                        out.extend(entries)
                        break
                except (zlib.error, struct.error, OverflowError):
                    continue
        i = data.find(b"TREE", i + 4)
    return out


def _damage(path, how):
    """Damage an HDF5 file the way a kill mid-write can.

    "positions": zero the stored (zlib) chunk of iteration 2's positions; openmmtools' resume does not
    read it, the later ``read_replica`` fails with "RuntimeError: NetCDF: HDF error" (the CI failure).
    "index": overwrite the signatures of the B-tree nodes of the chunk indices (all but the root group's).
    "truncate": cut off the second half of the file."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[len(data) // 2:]
    elif how == "positions":
        chunks = _zlib_chunks(bytes(data))
        assert len(chunks) >= 4, chunks
        a, n = chunks[2]
        data[a:a + n] = bytes(n)
    else:
        hits = [i for i in range(len(data) - 4) if data[i:i + 4] == b"TREE"]
        assert hits, "no v1 B-tree node found in the file"
        for i in hits[1:]:  # keep the first (the root group's): the file still opens
            data[i:i + 4] = b"\0\0\0\0"
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def _no_restore_warning():
    """StorageRestoredWarning (a lossy restore) is an error inside this block."""
    from boltzflow.replica.storage import StorageRestoredWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", StorageRestoredWarning)
        yield


@pytest.mark.parametrize("how", ["positions", "index", "truncate"])
def test_resume_from_damaged_storage_uses_the_snapshots(tmp_path, how):
    """Storage damaged by a kill mid-write (the CI failure: resume fine, read_replica "NetCDF: HDF error"):
    the resume continues from the snapshots of the last checkpoint, loses nothing and reads everything."""
    from boltzflow.replica.storage import StorageCorruptError, check_storage, snapshot_pair

    system = harmonic_system(2)
    path = run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=7, checkpoint_interval=2, **SMALL),
                                tmp_path, progress=False)
    assert json.loads((tmp_path / "replica_cost.json").read_text())["snapshot_iteration"] == 6
    assert check_storage(*snapshot_pair(path)) == 6
    _damage(path, how)
    with pytest.raises(StorageCorruptError, match="replica.nc"):
        check_storage(path)
    leftover = tmp_path / ".replica.nc.snapshot.k1ll3d.partial"  # a snapshot copy killed midway
    leftover.write_bytes(b"half a copy")
    # resuming at the last checkpoint is what a resume does anyway: no warning, unless the storage cannot
    # even be opened (then its last checkpoint is unknown)
    from boltzflow.replica.storage import StorageRestoredWarning

    expect = (pytest.warns(StorageRestoredWarning, match="cannot be opened.*iteration 6 .*cannot be read")
              if how == "truncate" else _no_restore_warning())
    with expect:
        run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=12, checkpoint_interval=2, **SMALL),
                             tmp_path, progress=False)
    assert not leftover.exists()
    assert check_storage(path) == 12
    data = read_replica(path)
    assert data.n_iterations == 12 and np.all(np.isfinite(data.energies)) and np.all(np.isfinite(data.positions))
    assert np.all(np.sort(data.states, axis=1) == np.arange(3))
    rec = json.loads((tmp_path / "replica_config.json").read_text())
    assert rec["resumed_from_iteration"] == 6 and rec["resume_source"] == "snapshot"
    assert [r["iteration"] for r in rec["restored_from_snapshot"]] == ([6] if how == "truncate" else [])
    cost = json.loads((tmp_path / "replica_cost.json").read_text())
    assert cost["iteration"] == 12 and cost["snapshot_iteration"] == 12 and cost["wall_time_s"] > 0
    assert len(extract_samples(path)) > 0


def test_damaged_storage_newer_than_its_snapshots_goes_back_with_a_warning(tmp_path):
    """Snapshots older than the last checkpoint (skipped for size, or the kill hit the snapshot itself):
    an intact storage is continued as it is, a damaged one goes back to the snapshots with a warning."""
    import shutil

    from boltzflow.replica.storage import StorageRestoredWarning, snapshot_pair

    system = harmonic_system(2)
    cfg = ReplicaExchangeConfig(n_iterations=4, checkpoint_interval=2, **SMALL)
    path = run_replica_exchange(system, cfg, tmp_path, progress=False)
    old = tmp_path / "old"
    old.mkdir()
    for p in snapshot_pair(path):
        shutil.copy(p, old / p.name)  # the snapshots of iteration 4

    def run_to(n, snapshots_of_4=True):
        if snapshots_of_4:
            for p in snapshot_pair(path):
                shutil.copy(old / p.name, p)
        run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=n, checkpoint_interval=2, **SMALL),
                             tmp_path, progress=False)
        return json.loads((tmp_path / "replica_config.json").read_text())

    rec = run_to(9)  # intact storage, last checkpoint 8 > 4: continued in place
    assert rec["resumed_from_iteration"] == 4 and rec["resume_source"] == "snapshot"  # first resume: 4 == 4
    with _no_restore_warning():
        rec = run_to(11)
    assert rec["resumed_from_iteration"] == 8 and rec["resume_source"] == "storage"
    for p in snapshot_pair(path):
        shutil.copy(old / p.name, p)
    _damage(path, "positions")
    with pytest.warns(StorageRestoredWarning, match=r"replica\.nc'?: variable '/positions'.*iteration 4 \(the "
                                                    r"storage's last checkpoint was iteration 10\)"):
        rec = run_to(13, snapshots_of_4=False)
    assert rec["resumed_from_iteration"] == 4 and rec["resume_source"] == "snapshot"
    assert [r["iteration"] for r in rec["restored_from_snapshot"]] == [4]
    assert "HDF error" in rec["restored_from_snapshot"][0]["problem"]
    data = read_replica(path)
    assert data.n_iterations == 13 and np.all(np.isfinite(data.positions))
    cost = json.loads((tmp_path / "replica_cost.json").read_text())
    assert cost["iteration"] == 13 and cost["snapshot_iteration"] == 12


def test_damaged_storage_without_snapshots_is_a_clear_error(tmp_path):
    system = harmonic_system(2)
    cfg = ReplicaExchangeConfig(n_iterations=5, checkpoint_interval=2, **SMALL)
    path = run_replica_exchange(system, cfg, tmp_path, progress=False)
    for p in tmp_path.glob("*.snapshot"):
        p.unlink()  # a run made before snapshots existed
    _damage(path, "positions")
    damaged = path.read_bytes()
    with pytest.raises(InputError, match=r"cannot resume .*replica\.nc.*HDF error.*no snapshots.*new -o directory"):
        run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=8, checkpoint_interval=2, **SMALL),
                             tmp_path, progress=False)
    assert path.read_bytes() == damaged  # left as it was for the user to inspect


def test_inconsistent_storage_pair_and_stale_snapshots(tmp_path):
    """A checkpoint file older than the analysis file (a kill between the two replaces of a restore)
    is caught and repaired; snapshots without storage are neither reused nor deleted."""
    import shutil

    from boltzflow.replica.storage import StorageCorruptError, check_storage

    system = harmonic_system(2)
    cfg = ReplicaExchangeConfig(n_iterations=4, checkpoint_interval=2, **SMALL)
    path = run_replica_exchange(system, cfg, tmp_path, progress=False)
    ckpt = tmp_path / "replica_checkpoint.nc"
    shutil.copy(ckpt, tmp_path / "old_checkpoint.nc")
    run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=8, checkpoint_interval=2, **SMALL), tmp_path,
                         progress=False)
    os.replace(tmp_path / "old_checkpoint.nc", ckpt)
    with pytest.raises(StorageCorruptError, match="lacks the checkpoint of iteration 8"):
        check_storage(path)
    run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=9, checkpoint_interval=2, **SMALL), tmp_path,
                         progress=False)
    assert check_storage(path) == 9 and read_replica(path).n_iterations == 9
    path.unlink()
    ckpt.unlink()
    with pytest.raises(InputError, match="snapshots of an earlier run"):
        run_replica_exchange(system, cfg, tmp_path, progress=False)
    assert (tmp_path / "replica.nc.snapshot").is_file()


def test_storage_openmmtools_cannot_resume_goes_back_to_the_snapshots(tmp_path):
    """A storage every variable of which reads, but whose stored MCMC move openmmtools cannot rebuild
    (bytes damaged inside a string), falls back to the (older) snapshots as well."""
    from boltzflow.replica.storage import StorageRestoredWarning, check_storage, snapshot_pair

    system = harmonic_system(2)
    path = run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=4, checkpoint_interval=2, **SMALL),
                                tmp_path, progress=False)
    old = {p: p.read_bytes() for p in snapshot_pair(path)}  # the snapshots of iteration 4
    run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=7, checkpoint_interval=2, **SMALL), tmp_path,
                         progress=False)
    for p, b in old.items():
        p.write_bytes(b)
    data = path.read_bytes()
    assert b"LangevinDynamicsMove" in data
    path.write_bytes(data.replace(b"LangevinDynamicsMove", b"LangevinDynamicsMovX"))
    assert check_storage(path) == 7  # HDF5 sees nothing wrong
    with pytest.warns(StorageRestoredWarning, match="openmmtools could not resume.*iteration 4"):
        run_replica_exchange(system, ReplicaExchangeConfig(n_iterations=9, checkpoint_interval=2, **SMALL),
                             tmp_path, progress=False)
    assert read_replica(path).n_iterations == 9
