"""The weighting registry is the one place a weighting is declared: its factory builds every entry, the solver
rule lives there, and the CLI, the benchmark (and the service) offer exactly its entries."""

import pytest
import torch

from cdm.composition import ComposedDenoiser
from cdm.composition.registry import REGISTRY, WeightingContext, create_weighting, names, resolve_solver
from cdm.errors import CdmError
from cdm.sampling import STOCHASTIC, NoiseSchedule


def test_every_entry_is_built_by_the_one_factory():
    loaded = []
    ctx = WeightingContext(schedule=NoiseSchedule(), seed=3, load=lambda name: loaded.append(name) or name,
                           log_density=[lambda x, t: x.flatten(1).sum(1)])
    for name, spec in REGISTRY.items():
        w = create_weighting(name, ctx)
        if spec.heads:
            assert w == name and spec.train and spec.train.startswith("cdm train-router --kind")
        else:
            assert w.name == name
    assert loaded == [n for n, s in REGISTRY.items() if s.heads]
    with pytest.raises(CdmError, match="needs schedule"):
        create_weighting("ito", WeightingContext())
    with pytest.raises(CdmError, match="unknown weighting 'bogus'; known: ito"):
        create_weighting("bogus")
    assert "oracle" not in names() and "oracle" in names(public=False)


def test_the_solver_follows_from_the_weighting():
    assert resolve_solver("ito", 2) in STOCHASTIC and resolve_solver("ito", 1) == "ddim"
    assert resolve_solver("router", 3) == "ddim" and resolve_solver("naive", 2, "dpmpp2m") == "dpmpp2m"
    with pytest.raises(CdmError, match="stochastic path"):
        resolve_solver("ito", 2, "ddim")


def test_cli_and_benchmark_offer_exactly_the_registry():
    from cdm.benchmark import METHODS
    from cdm.cli.main import HeadKind, Weighting

    assert [w.value for w in Weighting] == names() and list(METHODS) == names()
    assert sorted(k.value for k in HeadKind) == sorted({s.heads for s in REGISTRY.values() if s.heads})


def test_a_weighting_built_by_the_factory_composes():
    ctx = WeightingContext(schedule=NoiseSchedule(), seed=0)
    for name in ("ito", "naive", "single"):
        comp = ComposedDenoiser([lambda x, t: x, lambda x, t: -x], create_weighting(name, ctx), priors=[1, 3])
        out = comp(torch.ones(4, 1, 2, 2), torch.full((4,), 500))
        assert out.shape == (4, 1, 2, 2) and torch.isfinite(out).all()
