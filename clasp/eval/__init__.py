"""Frozen-feature evaluation: re-ID retrieval, attribute, parsing and pose probes.

    encoder = clasp.load_backbone("clasp-vit-s.safetensors")
    bank = FeatureBank(encoder)                      # features cached per (set, prompt)
    loader = SetLoader(bank.size)                    # each split decoded once per run
    result = run_protocol("reid", bank, loader, "market", "data/market1501", task="reid")

The command line is `clasp eval` (`clasp.eval.cli`); metrics are in `clasp.eval.metrics`.
"""

from .features import FeatureBank, load_encoder, parse_task
from .protocols import PRIMARY_METRIC, PROTOCOLS, SetLoader, run_protocol, task_prompt_matrix

__all__ = [
    "PRIMARY_METRIC",
    "PROTOCOLS",
    "FeatureBank",
    "SetLoader",
    "load_encoder",
    "parse_task",
    "run_protocol",
    "task_prompt_matrix",
]
