"""KL coefficient controllers: fixed, or adaptive towards a target KL (Ziegler et al. 2019)."""

from __future__ import annotations


class KLController:
    """Holds the KL coefficient; `update` adapts it when `adaptive`.

    Adaptive rule, as lm-human-preferences (the paper's code), TRL and OpenRLHF compute it:
    e = clip(kl / target - 1, -0.2, 0.2); coef *= 1 + e * n / horizon, where n is the number of
    samples the KL was measured on and `horizon` is counted in samples too (10,000 there). The
    paper writes the gain as K_beta = 0.1 per batch; in this form it is n / horizon (0.0256 for
    256 samples per iteration and the default horizon), so the rate follows the batch size.
    """

    def __init__(self, coef: float, adaptive: bool = False, target: float = 0.1,
                 horizon: int = 10000) -> None:
        self.coef, self.adaptive, self.target, self.horizon = coef, adaptive, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        """Move the coefficient after an iteration whose `n_samples` samples had mean KL `kl`."""
        if not self.adaptive:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_samples / self.horizon

    def state(self) -> dict[str, float]:
        return {"kl_coef": self.coef}

    def load(self, state: dict[str, float]) -> None:
        self.coef = float(state["kl_coef"])
