"""Case files shipped with koifish; `default.json` is what `koifish train` runs with no case."""
from pathlib import Path

CASES_DIR = Path(__file__).resolve().parent


def case_path(name: str) -> Path:
    return CASES_DIR / name

