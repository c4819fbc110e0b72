"""``cdm bench``: the seed paper's evaluation on the embedded data, with plots and a report.

Parts (each cached under ``OUT/parts/<part>.json`` with its stores under ``OUT/stores``, so an interrupted or
chunked run resumes where it stopped; ``--parts`` picks some):

- ``paragon``: one compartment on all 4,000 protected digits, ``budget`` optimiser steps (the "no split"
  reference). Sampled once; the same paragon row appears at every split.
- ``table1``: for K in ``splits``: the protected digits in K stratified sources, one class-conditional
  compartment each with ``budget // K`` steps (so all K compartments together get the paragon's budget, at the
  same batch size: the fair division), a router and one isolated head per source (``head_steps`` each). Then
  class-balanced samples composed with ``router``, ``isolated``, ``ito``, ``naive``, and ``single`` (one
  compartment, source 0), scored by FID against the 4,000 protected digits (features of the shipped
  classifier; same N and reference in every cell).
- ``two_domain``: digits 0-4 vs 5-9 as two unconditional compartments; composed vs naive grids, the share of
  samples the classifier reads confidently (max-prob >= 0.8) and the domain split among those, w_i(t).
- ``cost``: 1 vs K_max compartments, dense vs sparse gating (router, threshold), evaluations, seconds, FID.
- ``continual``: the K_max sources added one at a time, then dropped one at a time (Itô weights: training-free,
  so nothing but the compartments changes); FID relative to one source.
- ``forget``: on the K_max store: forget one sample (exact retrain of one compartment) and one source, as
  ratios to the paragon's training time.
- ``memorization``: per method, the share of samples whose nearest training digit (L2 on the model's 14x14
  pixels, and on classifier features) is closer than the 5th percentile of train-to-train nearest-neighbour
  distances.

All sampling uses the ancestral DDPM sampler (the Itô weighting needs a stochastic one) with the same steps,
seed and guidance for every method. Every evaluated sample set is saved as ``OUT/samples/<name>.npz``.
"""

from .bench import Bench
from .parts import PARTS
from .plots import plot_continual, plot_credit, plot_table1, plot_two_domain
from .profiles import DOMAINS, METHODS, PROFILES, BenchProfile, selection, with_overrides
from .report import CLEARLY_WORSE, report, where_ran
from .run import run_bench

__all__ = ["CLEARLY_WORSE", "DOMAINS", "METHODS", "PARTS", "PROFILES", "Bench", "BenchProfile", "plot_continual",
           "plot_credit", "plot_table1", "plot_two_domain", "report", "run_bench", "selection", "where_ran",
           "with_overrides"]
