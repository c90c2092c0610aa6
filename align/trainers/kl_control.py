"""KL coefficient controllers: fixed, or adaptive towards a target KL (Ziegler et al. 2019)."""

from __future__ import annotations


class KLController:
    """Holds the KL coefficient; `update` adapts it when `adaptive`.

    Adaptive rule: e = clip(kl / target - 1, -0.2, 0.2); coef *= 1 + e * n / horizon, with n the
    sequences in the batch counted in iterations here (one update per iteration).
    """

    def __init__(self, coef: float, adaptive: bool = False, target: float = 0.1,
                 horizon: int = 100) -> None:
        self.coef, self.adaptive, self.target, self.horizon = coef, adaptive, target, horizon

    def update(self, kl: float) -> None:
        if not self.adaptive:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error / self.horizon

    def state(self) -> dict[str, float]:
        return {"kl_coef": self.coef}

    def load(self, state: dict[str, float]) -> None:
        self.coef = float(state["kl_coef"])
