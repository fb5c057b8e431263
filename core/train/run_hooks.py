"""What the trainer asks each step besides the step itself: the learning-rate factor, fault
injection, and the instability monitor's verdicts and actions. Kept apart so the loop stays short."""

from __future__ import annotations

from koifish_core.errors import KoifishError
from koifish_core.train import checkpoint
from koifish_core.train.faults import corrupt_batches
from koifish_core.train.instability import SEVERITY, InstabilityConfig, InstabilityMonitor


class RunHooks:
    def __init__(self, case, faults, run_dir, log):
        self.case, self.run_dir, self.log = case, run_dir, log
        self.faults = {(f.kind, f.step) for f in faults}
        self.cfg = InstabilityConfig.from_dict(case.instability, "case: instability")
        self.monitor = InstabilityMonitor(self.cfg)
        self.pending = None  # the verdict of this step, taken inside the engine's gate
        self.last_signals = {}
        self.rollbacks = 0

    def lr_factor(self, step: int) -> float:
        return self.monitor.lr_factor(step)

    def before_step(self, step: int, batches):
        if ("spike", step) in self.faults:
            return corrupt_batches(batches, self.case.model.vocab_size, seed=step)
        return batches

    def poison_grads(self, step: int) -> bool:
        return ("nan", step) in self.faults

    def gate(self, step: int):
        """The engine calls this with the step's loss and gradient norm before updating, and with
        what else it measured (update_ratio, max_logit, tensor) where it can."""
        def decide(loss: float, grad_norm: float, signals: dict | None = None) -> bool:
            signals = signals or {}
            self.pending = self.monitor.observe(step, loss, grad_norm, **signals)
            self.last_signals = signals
            return self.pending.apply_update
        self.pending, self.last_signals = None, {}
        return decide

    def train_fields(self) -> dict:
        """Extra fields of this step's train record: the largest update ratio and logit, when measured."""
        s, out = self.last_signals, {}
        if s.get("update_ratio"):
            out["update_ratio"] = max(s["update_ratio"].values())
        if s.get("max_logit") is not None:
            out["max_logit"] = s["max_logit"]
        return out

    def after_step(self, step: int, result, engine, loader) -> None:
        decision, self.pending = self.pending, None
        if ("inf-param", step) in self.faults:
            engine.poison_params()
        events = list(decision.events) if decision is not None else []
        if decision is None and not result.applied:  # the engine refused a non-finite gradient itself
            events.append({"signal": "nonfinite_grad", "value": result.grad_norm, "z": None, "action": "skip"})
        if self.cfg.enabled:
            bad = engine.nonfinite_tensor()
            if bad is not None:
                events.append({"signal": "nonfinite_param", "value": None, "z": None, "tensor": bad,
                               "action": "rollback"})
        for ev in events:
            self.log("event", step, **ev)
        if not events:
            return
        worst = max(events, key=lambda e: SEVERITY[e["action"]])
        if worst["action"] == "stop":
            raise KoifishError(self._stop_message(step, worst, "instability.spike_action is stop"))
        if worst["action"] == "rollback":
            self._rollback(step, worst, engine)

    def _rollback(self, step: int, event: dict, engine) -> None:
        if self.rollbacks >= self.cfg.max_recoveries:
            raise KoifishError(self._stop_message(step, event, f"{self.rollbacks} rollbacks did not help"))
        good = checkpoint.latest(self.run_dir)
        if good is None:
            raise KoifishError(self._stop_message(step, event, "no checkpoint to roll back to yet"))
        model, optim, state = checkpoint.load(good)
        engine.load_tensors(model, optim, good)
        self.rollbacks += 1
        self.monitor.restart_history()
        # The loader is not rewound: the batches since the checkpoint, which led into the trouble,
        # are skipped (PaLM's remedy). The step counter goes on, so the stream stays monotonic.
        self.log("event", step, signal="rollback", value=state["step"], z=None, action="rolled_back",
                 message=f"weights and optimizer restored from step {state['step']}; "
                         f"{step - state['step']} steps of updates dropped, their data skipped")

    @staticmethod
    def _stop_message(step: int, event: dict, why: str) -> str:
        tensor = f", tensor {event['tensor']}" if event.get("tensor") else ""
        return f"training stopped at step {step}: signal {event['signal']}{tensor} ({why})"
