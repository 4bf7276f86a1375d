"""The classical reference: logistic regression on a PCA of the hidden state, per layer pair.

For a pair (l, d) it fits PCA(h_l) -> one logistic regression per expert of layer l+d
(one-vs-rest, multi-label) with scikit-learn. Both steps are linear, so the fitted model is
kept as plain tensors (mean, components, coefficients) and forecasts run in torch; nothing
pickled goes into checkpoints. It covers only the pairs it was fitted for (:meth:`covers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from core.model_info import check_lookahead
from predictors.base import PredictContext, Predictor

NEVER = -30.0  # logit of an expert never chosen at l+d in training (sigmoid ~ 1e-13)


def _pair_key(layer: int, distance: int) -> str:
    return f"{layer}_{distance}"


class SklearnLogReg(Predictor):
    family = "sklearn_logreg"
    needs = frozenset({"hidden"})
    kernels = 2  # PCA projection, logistic head

    def __init__(self, num_layers: int, num_experts: int, top_k: int, lookahead: int,
                 pairs: dict[tuple[int, int], dict[str, torch.Tensor]], n_components: int = 32, C: float = 1.0):
        check_lookahead(lookahead, num_layers)
        super().__init__(num_layers, num_experts, top_k, lookahead)
        self.pairs = pairs  # (l, d) -> mean (H,), components (P, H), coef (E, P), intercept (E,)
        self.n_components, self.C = n_components, C

    @classmethod
    def fit(cls, hidden: dict[int, np.ndarray], topk_ids: np.ndarray, pairs: Sequence[tuple[int, int]], *,
            num_experts: int, lookahead: int, n_components: int = 32, C: float = 1.0, seed: int = 0) -> SklearnLogReg:
        """hidden: layer -> (N, H) MoE inputs of the training tokens; topk_ids: (N, L, K) their routes."""
        # sklearn: ~1 s to import; only when the sklearn baseline is fitted
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression

        n, num_layers, top_k = topk_ids.shape
        fitted: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for layer, d in pairs:
            if layer not in hidden:
                raise UserError(f"sklearn_logreg: no hidden states at layer {layer} to fit the pair ({layer}, {d})")
            if not (1 <= d <= lookahead and layer + d < num_layers):
                raise UserError(f"sklearn_logreg: pair ({layer}, {d}) runs past the last layer ({num_layers} layers)")
            x = np.asarray(hidden[layer], dtype=np.float32)
            pca = PCA(n_components=min(n_components, x.shape[1], n), random_state=seed).fit(x)
            z = pca.transform(x)
            coef = np.zeros((num_experts, pca.n_components_), dtype=np.float32)
            intercept = np.full(num_experts, NEVER, dtype=np.float32)
            target = np.zeros((n, num_experts), dtype=np.int64)
            np.put_along_axis(target, topk_ids[:, layer + d].astype(np.int64), 1, axis=1)
            for e in range(num_experts):
                y = target[:, e]
                if y.min() == y.max():  # always or never chosen: a constant
                    intercept[e] = -NEVER if y[0] else NEVER
                    continue
                lr = LogisticRegression(C=C, max_iter=200).fit(z, y)
                coef[e], intercept[e] = lr.coef_[0], lr.intercept_[0]
            fitted[(layer, d)] = {
                "mean": torch.from_numpy(pca.mean_.astype(np.float32)),
                "components": torch.from_numpy(pca.components_.astype(np.float32)),
                "coef": torch.from_numpy(coef),
                "intercept": torch.from_numpy(intercept),
            }
        return cls(num_layers, num_experts, top_k, lookahead, fitted, n_components, C)

    def covers(self, layer: int, distance: int) -> bool:
        return (layer, distance) in self.pairs

    @torch.no_grad()
    def predict(self, ctx: PredictContext) -> torch.Tensor:
        if ctx.hidden is None:
            raise UserError(f"{self.family} needs the MoE-input hidden state of layer {ctx.layer}")
        h = ctx.hidden.float()
        out = h.new_zeros((h.shape[0], self.lookahead, self.num_experts))
        for d in range(1, self.lookahead + 1):
            p = self.pairs.get((ctx.layer, d))
            if p is not None:
                z = (h - p["mean"]) @ p["components"].T
                out[:, d - 1] = torch.sigmoid(z @ p["coef"].T + p["intercept"])
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pairs": sorted(self.pairs), "n_components": self.n_components, "C": self.C}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{_pair_key(*pair)}.{name}": t for pair, p in self.pairs.items() for name, t in p.items()}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> SklearnLogReg:
        pairs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            pair, name = key.split(".")
            layer, d = (int(x) for x in pair.split("_"))
            pairs.setdefault((layer, d), {})[name] = t
        return cls(int(hparams["num_layers"]), int(hparams["num_experts"]), int(hparams["top_k"]),
                   int(hparams["lookahead"]), pairs, int(hparams["n_components"]), float(hparams["C"]))
