"""What the trainer asks each step besides the step itself: learning-rate factors, fault
injection and the instability monitor's actions. Kept apart so the loop stays one screen."""

from __future__ import annotations


class RunHooks:
    def __init__(self, case, faults, run_dir, log):
        self.case, self.faults, self.run_dir, self.log = case, list(faults), run_dir, log
        if self.faults:
            from koifish_core.errors import KoifishError

            raise KoifishError("--inject needs the instability monitor, which this build does not have yet")

    def lr_factor(self, step: int) -> float:
        return 1.0

    def before_step(self, step: int, batches, engine):
        return batches

    def after_step(self, step: int, result, engine, loader, save) -> None:
        if not result.applied:
            self.log("event", step, signal="nonfinite_grad", value=result.grad_norm, action="skip")
