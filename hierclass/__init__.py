"""hierclass: two-stage (router + experts) image classification into a deep category tree."""

from hierclass.errors import CheckpointError, DumpError, HierclassError, TaxonomyError
from hierclass.taxonomy import Taxonomy

__all__ = ["CheckpointError", "DumpError", "HierclassError", "Taxonomy", "TaxonomyError"]
__version__ = "0.1.0"
