"""Model merging: linear, task arithmetic, TIES, DARE, SLERP and LoRA fuse, streamed.

``merge_models(recipe.yaml, "name:tag")`` runs a mergekit-style YAML recipe tensor by
tensor over memory-mapped inputs and records the result, its parents and the recipe in
the local hub; :mod:`folklm.merge.methods` holds the maths as pure tensor functions.
"""

from folklm.merge.api import MergeReport, merge_models
from folklm.merge.config import MergeConfig, load_config, parse_config
from folklm.merge.executor import MergeStats, run_merge

__all__ = [
    "MergeConfig",
    "MergeReport",
    "MergeStats",
    "load_config",
    "merge_models",
    "parse_config",
    "run_merge",
]
