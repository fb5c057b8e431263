"""Columns of numbers that grow one record at a time, readable as NumPy views without copying."""

from __future__ import annotations

import numpy as np


def as_float(value) -> float:
    """A record's number as a float; NaN for missing values and the "nan"/"inf" strings the writer uses."""
    if isinstance(value, bool) or value is None:
        return float("nan")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)  # "nan", "inf", "-inf" as MetricsWriter spells non-finite numbers
    except (TypeError, ValueError):
        return float("nan")


class Columns:
    """Named float64 columns of equal length; append is amortised O(1) (capacity doubles)."""

    def __init__(self, names: tuple[str, ...], capacity: int = 1024):
        self.names = names
        self._data = np.full((len(names), capacity), np.nan)
        self.n = 0

    def append(self, record: dict) -> None:
        if self.n == self._data.shape[1]:
            grown = np.full((len(self.names), 2 * self.n), np.nan)
            grown[:, : self.n] = self._data
            self._data = grown
        for i, name in enumerate(self.names):
            self._data[i, self.n] = as_float(record.get(name))
        self.n += 1

    def __getitem__(self, name: str) -> np.ndarray:
        return self._data[self.names.index(name), : self.n]

    def __len__(self) -> int:
        return self.n

    def clear(self) -> None:
        self.n = 0
