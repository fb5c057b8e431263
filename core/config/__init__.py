"""Case files: the typed schema, loading and validation, the original Koifish layout, the plan."""

from koifish_core.config.load import LoadedCase, build_case, case_to_dict, load_case
from koifish_core.config.schema import Case

__all__ = ["Case", "LoadedCase", "build_case", "case_to_dict", "load_case"]
