"""The stages. Each module registers its `apply` with `@stage(Config)` (compressor/stages/base.py);
importing the package imports them all, so `STAGES` names every stage the pipeline can run."""
# Each stage module registers itself on import.
from compressor.stages import activation, align, cluster, depth, search, sparse_opt, weight  # noqa: F401
from compressor.stages.base import STAGES, StageContext, StageOutcome, StageSpec, stage, structured_names

__all__ = ["STAGES", "StageContext", "StageOutcome", "StageSpec", "stage", "structured_names"]
