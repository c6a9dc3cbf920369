"""Data parallelism with torch.distributed (gloo, CPU, 2 processes launched by the test).

After k steps every rank holds the same parameters, equal to one process that saw the
concatenated batch: with the no-wrapper pattern and with a DistributedDataParallel model
(optimizer built on the wrapper or on ``ddp.module``, gradient accumulation under
``no_sync()``, a summed loss), where the optimizer sends its statistics only.
"""

import contextlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import destroy_process_group, flat_parameters
from torch import nn

import kfac_tn

WORLD = 2
STEPS = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 10 * 10, 5),
    )


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 5, 5, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def _optimizer(name, model):
    if name.startswith(("ddp", "sum")):
        return _ddp_optimizer(name, model)
    if name.startswith(("kfac", "shard_kfac")):
        spread = name == "kfac_spread"  # worker groups; eigh: receive buffers for Q and eigenvalues
        return kfac_tn.KFAC(model, lr=0.05, damping=1e-2, inverse_update_freq=2,
                            update_worker_fraction=0.5 if spread else 1.0, inverse_method="eigh" if spread else "cholesky",
                            shard_preconditioner="shard" in name)
    if name.startswith("shard"):  # one process: sharding has no effect (the reference run)
        structures = ("diagonal", "dense") if "diag" in name else ("dense", "dense")
        return kfac_tn.SINGD(model, lr=0.05, lr_cov=0.1, T=2, structures=structures, alpha1=0.3,
                             kfac_approx="expand" if "expand" in name else "reduce", shard_preconditioner=True)
    structures = {"singd_dense": ("dense", "dense"), "singd_diag": ("diagonal", "dense"),
                  "singd_greedy": ("dense", "dense")}[name]
    fraction = 0.5 if name == "singd_greedy" else 1.0
    return kfac_tn.SINGD(model, lr=0.05, lr_cov=0.1, T=2, structures=structures, kfac_approx="reduce",
                         update_worker_fraction=fraction)


def _ddp_optimizer(name, model):
    loss_average = None if "sum" in name else "batch"
    if "kfac" in name:
        return kfac_tn.KFAC(model, lr=0.05, damping=1e-2, inverse_update_freq=2, loss_average=loss_average,
                            shard_preconditioner="shard" in name)
    structure = "diagonal" if "diag" in name else "dense"
    return kfac_tn.SINGD(model, lr=0.05, lr_cov=0.1, T=2, structures=(structure, structure), kfac_approx="reduce",
                         loss_average=loss_average, shard_preconditioner="shard" in name)


def _train(model, opt, X, y, name=""):
    """STEPS steps; ``nosync`` runs: two micro-batches per step, the first in ``no_sync()``
    (mean/2 each); ``sum`` runs: a summed loss."""
    reduction = "sum" if "sum" in name else "mean"
    for _ in range(STEPS):
        opt.zero_grad()
        if "nosync" in name:
            with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
                (nn.functional.cross_entropy(model(X[::2]), y[::2]) / 2).backward()
            (nn.functional.cross_entropy(model(X[1::2]), y[1::2]) / 2).backward()
        else:
            nn.functional.cross_entropy(model(X), y, reduction=reduction).backward()
        opt.step()
    return flat_parameters(model)


def _join(rank, init_file):
    """Join the gloo group; this rank's half of the batch and a fresh model."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    X, y = _data()
    shard = slice(rank * 4, (rank + 1) * 4)
    return X[shard], y[shard], _model()


def _worker(rank, name, init_file, out_dir):
    X, y, model = _join(rank, init_file)
    try:
        reduced = []
        if name.startswith("ddp"):  # DDP averages the gradients; the optimizer sends statistics only
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = _optimizer(name, ddp.module if "module" in name else ddp)
            real = dist.all_reduce
            dist.all_reduce = lambda t, *a, **k: (reduced.append(t.numel()), real(t, *a, **k))[1]
            try:
                params = _train(ddp, opt, X, y, name)
            finally:
                dist.all_reduce = real
            if "kfac" in name and "shard" not in name:  # (sharded: factors are reduced to owners)
                factors = sum(s["A"].numel() + s["G"].numel() for s in opt.kfac_state.values())
                assert sum(reduced) == STEPS * factors, (sum(reduced), factors)
        else:
            opt = _optimizer(name, model)
            params = _train(model, opt, X, y, name)
        if name == "singd_greedy":  # two groups of one rank each own layers: the work was spread
            assert set(opt._update_owners(2).values()) == {0, 1}
        if "shard" in name:  # this rank's layers, and the whole state gathered from both ranks
            owned = sorted(n for n, s in opt.kfac_state.items() if s) if "kfac" in name else sorted(opt.Ks)
            torch.save({"owned": owned, "state": opt.state_dict()}, os.path.join(out_dir, f"state{rank}.pt"))
        torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another is still communicating
        ddp = opt = None  # DDP holds the group: drop it first (see helpers.destroy_process_group)
    finally:
        destroy_process_group()


@pytest.mark.parametrize("name", ["singd_dense", "singd_diag", "singd_greedy", "kfac", "kfac_spread", "ddp_kfac",
                                  "ddp_singd", "ddp_module_nosync_kfac", "ddp_module_nosync_singd", "ddp_sum_singd",
                                  "ddp_sum_kfac", "sum_singd", "sum_singd_diag", "shard_singd", "shard_singd_diag_expand",
                                  "ddp_shard_singd", "ddp_shard_sum_singd", "sum_shard_singd", "shard_kfac",
                                  "ddp_shard_kfac"])
def test_ranks_agree_with_a_single_process_on_the_whole_batch(name):
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.start_processes(_worker, args=(name, init_file, out_dir), nprocs=WORLD, start_method="spawn")
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
        shards = [torch.load(os.path.join(out_dir, f"state{r}.pt"), weights_only=False)
                  for r in range(WORLD)] if "shard" in name else None
    assert torch.equal(ranks[0], ranks[1])
    model = _model()
    X, y = _data()
    opt = _optimizer(name, model)
    single = _train(model, opt, X, y, "sum" if "sum" in name else "")
    torch.testing.assert_close(ranks[0], single, rtol=1e-4, atol=1e-5)
    if shards is not None:
        (_check_kfac_shards if "kfac" in name else _check_shards)(shards, name, opt)
    if "kfac" in name and "sum" not in name:  # and all follow a literal KFAC on the whole batch
        from reference_kfac import ReferenceKFAC

        reference = _model()
        oracle = ReferenceKFAC(reference, lr=0.05, damping=1e-2, inverse_update_freq=2)
        for _ in range(STEPS):
            oracle.step(X, y)
        expected = flat_parameters(reference)
        torch.testing.assert_close(ranks[0], expected, rtol=1e-4, atol=1e-5)


def _check_kfac_shards(shards, name, single_opt):
    """KFAC: each layer's A, G and inverses live on one rank; the gathered state equals the
    single process's and loads into a single process."""
    owned = [set(s["owned"]) for s in shards]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(single_opt.kfac_state) and all(owned)
    expected = single_opt.state_dict()["kfac"]["layers"]
    for shard in shards:
        layers = shard["state"]["kfac"]["layers"]
        assert list(layers) == list(expected)
        for layer, entry in expected.items():
            assert set(layers[layer]) == set(entry)
            for key in set(entry) - {"Q_A", "Q_G"}:  # factors, flags, Cholesky inverses or eigenvalues (not
                # eigenvectors: those are unique up to sign)
                torch.testing.assert_close(layers[layer][key], entry[key], rtol=1e-4, atol=1e-5)
    loaded = _optimizer(name, _model())
    loaded.load_state_dict(shards[0]["state"])
    for layer, entry in expected.items():
        torch.testing.assert_close(loaded.kfac_state[layer]["A"], entry["A"], rtol=1e-4, atol=1e-5)


def _tensors_of(entry):
    """All tensors of a state entry (one matrix, or a list of blocks), in order."""
    if isinstance(entry, list):
        return [t for e in entry for t in _tensors_of(e)]
    return list(entry["tensors"].values())


def _check_shards(shards, name, single_opt):
    """Each layer's K, C live on one rank; the state gathered on each rank equals the
    single process's and loads into a single process (a checkpoint for any world size)."""
    owned = [set(s["owned"]) for s in shards]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(single_opt.Ks) and all(owned)
    expected = single_opt.state_dict()
    for shard in shards:
        for key in ("Ks", "Cs", "m_Ks", "m_Cs"):
            assert list(shard["state"][key]) == list(expected[key])
            for layer, entry in expected[key].items():
                for ours, theirs in zip(_tensors_of(shard["state"][key][layer]), _tensors_of(entry), strict=True):
                    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    model = _model()
    loaded = _optimizer(name, model)
    loaded.load_state_dict(shards[1]["state"])
    for layer in expected["Ks"]:
        for ours, theirs in zip(loaded.Ks[layer] if isinstance(loaded.Ks[layer], list) else [loaded.Ks[layer]],
                                single_opt.Ks[layer] if isinstance(single_opt.Ks[layer], list)
                                else [single_opt.Ks[layer]]):
            torch.testing.assert_close(ours.to_dense(), theirs.to_dense(), rtol=1e-4, atol=1e-5)



def _nan_worker(rank, name, init_file, out_dir):
    """STEPS steps; at the second, rank 1's batch holds a NaN input."""
    X, y, model = _join(rank, init_file)
    try:
        opt = _optimizer(name, model)
        trajectory = []
        for step in range(STEPS):
            X_step = X.clone()
            if step == 1 and rank == 1:
                X_step[0, 0, 0, 0] = float("nan")
            opt.zero_grad()
            nn.functional.cross_entropy(model(X_step), y).backward()
            with pytest.warns(UserWarning) if step == 1 else contextlib.nullcontext():
                opt.step()
                if hasattr(opt, "_deferred"):
                    opt._deferred.flush()  # the skip warning follows once its flag reached the host
            trajectory.append(flat_parameters(model))
        torch.save(torch.stack(trajectory), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        opt = None
    finally:
        destroy_process_group()


@pytest.mark.parametrize("name", ["singd_dense", "singd_diag", "shard_singd", "kfac", "shard_kfac"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(name):
    """Gradients and statistics are reduced over ranks, so a NaN in one rank's batch
    reaches every rank: all of them skip that step (parameters unchanged, finite) and
    go on identically, instead of the others applying the NaN."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.start_processes(_nan_worker, args=(name, init_file, out_dir), nprocs=WORLD, start_method="spawn")
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    assert torch.equal(ranks[0], ranks[1])
    assert torch.isfinite(ranks[0]).all()
    assert torch.equal(ranks[0][1], ranks[0][0])  # the second step was skipped
    assert not torch.equal(ranks[0][2], ranks[0][1])  # the third was taken
