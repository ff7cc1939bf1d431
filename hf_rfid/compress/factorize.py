"""Group SVD (step 3 and 8 of the method), optionally activation-whitened, and residual coding (step 9)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..modeling.residual import BlockProjection, ResidualProjection

logger = logging.getLogger(__name__)


@dataclass
class GroupFactorization:
    """Thin SVD of a group's stacked matrices M = [W_1; ...; W_k] (k*p x d), possibly of M S (whitened)."""

    left: torch.Tensor  # (k*p, r) U * s, float64
    right: torch.Tensor  # (r, d) V^T, un-whitened (V^T S^-1 when whitened), float64
    singular_values: torch.Tensor  # (r,) spectrum of the factorised matrix (whitened if whitening was used)
    rows_per_expert: int
    whitened: bool

    @property
    def max_rank(self) -> int:
        """Largest usable rank, min(k*p, d)."""
        return int(self.singular_values.numel())

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Basis B (rank x d) and per-expert coefficients A (k, p, rank), both float64."""
        rank = max(1, min(rank, self.max_rank))
        basis = self.right[:rank]
        coefficients = self.left[:, :rank].reshape(-1, self.rows_per_expert, rank)
        return basis, coefficients


def whitening_factors(gram: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S and S^-1 with S S^T = Gram, from an eigendecomposition with eigenvalues floored at `floor` * max."""
    gram = gram.to(torch.float64)
    gram = 0.5 * (gram + gram.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    top = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    if not top > 0:
        identity = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
        return identity, identity
    clipped = eigenvalues.clamp_min(floor * top)
    root = clipped.sqrt()
    return eigenvectors * root, (eigenvectors / root).T


def _thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD in float32, falling back to float64 when float32 fails or is not finite."""
    try:
        u, s, vh = torch.linalg.svd(matrix.to(torch.float32), full_matrices=False)
        if torch.isfinite(s).all() and torch.isfinite(u).all() and torch.isfinite(vh).all():
            return u.double(), s.double(), vh.double()
    except RuntimeError as error:  # LinAlgError subclasses RuntimeError
        logger.info("float32 SVD failed (%s); retrying in float64", error)
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return u, s, vh


def factorize_group(
    weights: torch.Tensor, gram: torch.Tensor | None = None, whitening_floor: float = 1e-6
) -> GroupFactorization:
    """Thin SVD of the stacked group matrix `weights` (k, p, d); whitened by the input `gram` (d, d) if given."""
    if not torch.isfinite(weights).all():
        raise ValueError("expert weights contain NaN or infinite values")
    experts, rows, cols = weights.shape
    stacked = weights.reshape(experts * rows, cols).to(torch.float64)
    if gram is None:
        u, s, vh = _thin_svd(stacked)
        return GroupFactorization(u * s, vh, s, rows, whitened=False)
    root, inverse_root = whitening_factors(gram, whitening_floor)
    u, s, vh = _thin_svd(stacked @ root)
    return GroupFactorization(u * s, vh @ inverse_root, s, rows, whitened=True)


def encode_residual(
    projection: ResidualProjection,
    residual: torch.Tensor,
    gram: torch.Tensor | None = None,
    ridge: float = 1e-6,
) -> torch.Tensor:
    """Code (D,) of one expert's residual R (p, d).

    Without `gram`: eta = P^T vec(R) (bucket means). With `gram` (only for `BlockProjection`, `residual="fit"`): the
    block means U minimise the output error sum_t |(R - U Q^T) x_t|^2 over the calibration inputs, i.e.
    U = R Sigma Q (Q^T Sigma Q + ridge)^-1, and eta = U * sqrt(block sizes).
    """
    if gram is None:
        return projection.encode(residual[None])[0]
    if not isinstance(projection, BlockProjection):
        raise ValueError("fitted residual codes need the block projection")
    gram = gram.to(torch.float64)
    device = gram.device
    membership = torch.zeros(projection.in_features, projection.blocks_per_row, dtype=torch.float64, device=device)
    membership[torch.arange(projection.in_features, device=device), projection.block_of_column.to(device)] = 1.0
    pooled_gram = membership.T @ gram @ membership
    scale = float(pooled_gram.diagonal().mean()) if pooled_gram.numel() else 1.0
    pooled_gram = pooled_gram + ridge * max(scale, 1e-30) * torch.eye(
        projection.blocks_per_row, dtype=torch.float64, device=device
    )
    cross = residual.to(device, torch.float64) @ gram @ membership  # (p, nb)
    means = torch.linalg.solve(pooled_gram, cross.T).T  # (p, nb)
    return (means * projection.block_sizes.to(device).sqrt()).reshape(-1)


def relative_error(original: torch.Tensor, approximation: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """|W - W_hat| / |W| in Frobenius norm, or in the activation norm sqrt(tr(E G E^T)) when `gram` is given."""
    original = original.detach().to(torch.float64)
    error = original - approximation.detach().to(torch.float64)
    if gram is None:
        denominator = float(original.norm())
        return float(error.norm()) / denominator if denominator > 0 else 0.0
    gram = gram.detach().to(original.device, torch.float64)
    error = error.to(original.device)
    denominator = float(torch.einsum("ij,jk,ik->", original, gram, original))
    numerator = float(torch.einsum("ij,jk,ik->", error, gram, error))
    return (max(numerator, 0.0) / denominator) ** 0.5 if denominator > 0 else 0.0


def select_residual_columns(residuals: list[torch.Tensor], gram: torch.Tensor | None, count: int) -> torch.Tensor:
    """The `count` input columns holding the most activation-weighted residual energy of a group.

    Score of column c: sum over the group's experts of |R_i[:, c]|^2, times the input energy Gram[c, c] when a Gram
    is given. Ties go to the lower index. Returned in descending score order.
    """
    energy = torch.stack([r.to(torch.float64).pow(2).sum(0) for r in residuals]).sum(0)
    if gram is not None:
        energy = energy * gram.to(torch.float64).diagonal().clamp_min(0)
    order = sorted(range(energy.numel()), key=lambda c: (-float(energy[c]), c))
    return torch.tensor(order[:count], dtype=torch.int64)


def refit_coefficients(
    weight: torch.Tensor,
    basis: torch.Tensor,
    gram: torch.Tensor,
    initial: torch.Tensor | None = None,
    ridge: float = 1e-3,
) -> torch.Tensor:
    """Coefficients A (p x K) minimising sum_t |(W - A B) x_t|^2 + lam |A - A0|^2 for a fixed basis B.

    A = (W G B^T + lam A0) (B G B^T + lam I)^-1 with G the expert's input Gram, A0 the SVD coefficients
    (`initial`, zero if not given) and lam = `ridge` x the mean diagonal of B G B^T. The group SVD chose B for the
    pooled inputs of the group; this adapts every expert's coefficients to its own routed tokens. The ridge pulls
    towards A0, so directions the expert's few calibration tokens do not cover keep the SVD solution, and the
    calibration error is never above that of A0.
    """
    gram = gram.to(torch.float64)
    weight, basis = weight.to(gram.device, torch.float64), basis.to(gram.device, torch.float64)
    projected = basis @ gram  # (K, d)
    lhs = projected @ basis.T
    scale = ridge * max(float(lhs.diagonal().mean()) if lhs.numel() else 1.0, 1e-30)
    lhs = lhs + scale * torch.eye(lhs.shape[0], dtype=torch.float64, device=gram.device)
    rhs = weight @ projected.T
    if initial is not None:
        rhs = rhs + scale * initial.to(gram.device, torch.float64)
    return torch.linalg.solve(lhs, rhs.T).T
