"""Fault injection, for testing that instabilities are caught and recovered from.

    --inject nan@120        the gradient of step 120 is made non-finite
    --inject spike@300      step 300 trains on a corrupted batch (random targets): a loss spike
    --inject inf-param@500  a weight becomes infinite after the update of step 500
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from koifish_core.errors import KoifishError

KINDS = ("nan", "spike", "inf-param")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int


def parse_inject(specs) -> list[Fault]:
    faults = []
    for spec in specs:
        kind, sep, step = str(spec).partition("@")
        if not sep or kind not in KINDS:
            raise KoifishError(f"--inject {spec}: expected KIND@STEP with KIND one of {', '.join(KINDS)}, e.g. nan@120")
        try:
            n = int(step)
        except ValueError:
            raise KoifishError(f"--inject {spec}: the step must be a whole number, got {step!r}") from None
        if n < 1:
            raise KoifishError(f"--inject {spec}: the step must be >= 1")
        faults.append(Fault(kind, n))
    return faults


def corrupt_batches(batches, vocab_size: int, seed: int):
    """A loss spike: the targets of every micro-batch replaced by random tokens."""
    rng = np.random.default_rng(seed)
    return [(x, rng.integers(0, vocab_size, y.shape).astype(y.dtype)) for x, y in batches]
