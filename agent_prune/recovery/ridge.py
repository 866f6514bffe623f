"""Ridge least squares from streamed statistics: the closed-form refit behind local reconstruction.

A linear map ``y = W x`` whose input lost features (channels or heads cut upstream) is refitted so
that, on calibration tokens, it reproduces a target ``t`` as well as a linear map can::

    W* = argmin_W  sum_n ||W x_n - t_n||^2 + ||(W - W0) D^(1/2)||^2
       = (T^T X + W0 D)(X^T X + D)^{-1},      D = ridge * diag(X^T X)

``W0`` (the prior; reconstruction passes the dense projection's weight on the kept inputs): the ridge
pulls the solution toward the weights the dense model had, not toward zero, so a strong ridge means
"change little" rather than "shrink every weight" (docs/benchmarks.md, "The refit's prior":
shrinking toward zero with a ridge of 0.1 made the 10% model worse than no refit at all, 44.2
against 37.8).

Only ``X^T X`` (d_in x d_in), ``X^T T`` (d_in x d_out) and ``sum ||t||^2`` are kept, accumulated batch
by batch in float64 (per-batch products in float32), so the calibration set never has to sit in
memory, and the squared error of any weight follows from them (the
SparseGPT/OBC layer-wise trick, Frantar & Alistarh, arXiv 2301.00774; ZipLM applies the same update
after structured cuts, Kurtic et al., arXiv 2302.04089). Damping is per feature (:func:`solve_ridge`).
"""

from __future__ import annotations

import torch

from agent_prune.sensitivity.metrics import gram


class LeastSquaresCollector:
    """Accumulates ``X^T X``, ``X^T Y`` and ``sum ||y||^2`` over batches; ``solve`` returns the ridge
    solution and ``error`` the squared error of any weight, both without the tokens.

    With an ``offset`` weight ``W0`` the regression target is ``X W0^T + Y`` and only ``Y`` is added:
    reconstruction passes the dense weight on the kept inputs, so ``Y`` is the removed channels'
    output alone and the kept channels' part never has to be computed per token (:mod:`.reconstruct`).
    """

    def __init__(self, in_features: int, out_features: int, offset: torch.Tensor | None = None):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.xty = torch.zeros(in_features, out_features, dtype=torch.float64)
        self.yty = 0.0
        self.offset = None if offset is None else offset.detach().double()
        self.count = 0

    def add_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add rows: ``inputs`` (..., d_in) and ``targets`` (..., d_out; ``Y``), flattened over the
        leading dims."""
        # One batch's products in float32 (fast), the running sums in float64 (no drift over batches).
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        t = targets.reshape(-1, targets.shape[-1]).float()
        if self.xtx.device != x.device:  # the sums live where the activations are (e.g. CUDA)
            self.xtx, self.xty = self.xtx.to(x.device), self.xty.to(x.device)
            self.offset = None if self.offset is None else self.offset.to(x.device)
        self.xtx += gram(x)  # promoted to float64 as it is added
        self.xty += (x.T @ t).double()
        self.yty += float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2)
        self.count += x.shape[0]

    def solve(self, ridge: float, prior: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (d_out x d_in, float64) minimising squared error plus the relative ridge
        around ``prior`` (a d_out x d_in weight; zero when None)."""
        if self.offset is None:
            return solve_ridge(self.xtx, self.xty, ridge, prior)
        # (X^T X + D)^-1 (X^T Y + X^T X W0^T + D P^T) = W0^T + (X^T X + D)^-1 (X^T Y + D (P - W0)^T)
        shift = -self.offset if prior is None else prior.to(self.offset) - self.offset
        return self.offset + solve_ridge(self.xtx, self.xty, ridge, shift if shift.any() else None)

    def error(self, weight: torch.Tensor | None) -> float:
        """``sum ||x W^T - t||^2`` over the added rows (``weight`` None: the target's own ``sum ||t||^2``)."""
        if weight is None and self.offset is None:
            return self.yty
        delta = -self.offset if weight is None else weight.to(self.xty)
        if weight is not None and self.offset is not None:
            delta = delta - self.offset
        quadratic = float(((delta @ self.xtx) * delta).sum())
        return max(quadratic - 2 * float((delta * self.xty.T).sum()) + self.yty, 0.0)

    def free(self) -> None:
        self.xtx = self.xty = self.offset = None


def solve_ridge(xtx: torch.Tensor, xty: torch.Tensor, ridge: float, prior: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``(xtx + D)^{-1} (xty + D prior^T)``, ``D = ridge * diag(xtx)``, transposed to a Linear weight.

    The damping is per feature (Levenberg-Marquardt style), i.e. the ridge of standardised features:
    LLM activations have a few channels orders of magnitude larger than the rest, and a damping
    proportional to the mean diagonal would be set by those and flatten every other weight. A tiny
    absolute floor keeps features that never fired (zero diagonal) solvable; their weights come out
    as the prior's (0 without one).
    """
    diag = torch.diagonal(xtx)
    damping = ridge * diag + 1e-8 * float(diag.mean()) + 1e-12
    damped = xtx + torch.diag(damping)
    if prior is not None:
        xty = xty + damping[:, None] * prior.to(xty).T
    chol, info = torch.linalg.cholesky_ex(damped)
    # Numerically indefinite despite damping (info > 0): fall back to a least-squares solve.
    solution = torch.cholesky_solve(xty, chol) if int(info) == 0 else torch.linalg.lstsq(damped, xty).solution
    return solution.T.contiguous()
