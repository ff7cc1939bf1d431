"""Sparse-projection residual codes (RFID-MoE step 9).

What the low-rank factors of an expert matrix W (out x in) leave out, R = W - A B, is partly kept as a short code
eta of D numbers per expert. A one-hot assignment h of the out*in positions into D buckets, shared by a group of
experts, defines the projection P (one non-zero per row, columns scaled by 1/sqrt(bucket count), so P^T P = I):

    eta = P^T vec(R)          (scaled bucket sums)
    R_hat = P eta             (every position gets the mean residual of its bucket)

Two assignments are implemented, and neither ever builds a dense per-expert residual to apply it:

* `HashProjection` (`residual="hash"`, the paper's seeded assignment). Positions are numbered by a seeded row
  permutation rho and column permutation gamma, L(o, c) = rho(o) * in + gamma(c), a bijection of [0, out*in), and
  h = L mod D. Every bucket holds floor(out*in/D) or that plus one positions. Because h(o, c) = (a_o + b_c) mod D is
  additive, R_hat x is a circular correlation: pool x into D bins by b, correlate with the bucket means by FFT and read
  the result at a. Cost per token O(in + D log D + out) instead of O(out * in).
* `BlockProjection` (`residual="blocks"` and `"fit"`): contiguous column blocks per row, h(o, c) = o * nb + blk(c).
  R_hat x = U (pool x), a pooled matmul with U of shape out x nb.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic, identical on every platform)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


def derive_seed(*parts: int) -> int:
    """Mix integers into one non-negative 63-bit seed (portable, no Python `hash`)."""
    state = np.uint64(0)
    for part in parts:
        with np.errstate(over="ignore"):
            state = _splitmix64(np.array([state ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))[0]
    return int(state >> np.uint64(1))


def seeded_permutation(n: int, seed: int) -> torch.Tensor:
    """A permutation of `range(n)` that depends only on `seed` (not on the torch or numpy version)."""
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ np.uint64(seed))
    return torch.from_numpy(np.argsort(keys, kind="stable").astype(np.int64))


def fft_friendly_size(limit: int) -> int:
    """The largest 2-3-5-smooth integer <= `limit` (FFT lengths with small prime factors are fast)."""
    for n in range(limit, 0, -1):
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
    return 0


class ResidualProjection:
    """A one-hot, column-normalised projection P (out*in x D) shared by the experts of one group."""

    out_features: int
    in_features: int
    code_dim: int

    def bucket_index(self) -> torch.Tensor:
        """The bucket of every position, an (out, in) int64 tensor (only for encoding, tests and dequantising)."""
        raise NotImplementedError

    def counts(self) -> torch.Tensor:
        """Number of positions in each bucket, a (D,) float64 tensor (all >= 1)."""
        raise NotImplementedError

    def encode(self, residuals: torch.Tensor) -> torch.Tensor:
        """eta = P^T vec(R) for a stack of residuals (n, out, in) -> codes (n, D), in float64."""
        index = self.bucket_index().reshape(-1).to(residuals.device)
        flat = residuals.reshape(residuals.shape[0], -1).to(torch.float64)
        sums = torch.zeros(flat.shape[0], self.code_dim, dtype=torch.float64, device=flat.device)
        sums.index_add_(1, index, flat)
        return sums / self.counts().to(flat.device).sqrt()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """R_hat = P eta as dense matrices (n, out, in): each position gets its bucket's mean."""
        means = codes.to(torch.float64) / self.counts().to(codes.device).sqrt()
        index = self.bucket_index().to(codes.device)
        return means[:, index]

    def apply(self, inputs: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """R_hat x for the rows of `inputs` (T, in) and one expert's code (D,) -> (T, out), without a dense R_hat."""
        raise NotImplementedError


class HashProjection(ResidualProjection):
    """Seeded additive hash h(o, c) = (rho(o) * in + gamma(c)) mod D; applied through an FFT correlation."""

    def __init__(self, out_features: int, in_features: int, code_dim: int, seed: int) -> None:
        if not 1 <= code_dim <= out_features * in_features:
            raise ValueError(f"hash residual code size must be in [1, {out_features * in_features}]; got {code_dim}")
        self.out_features, self.in_features, self.code_dim, self.seed = out_features, in_features, code_dim, seed
        rows = seeded_permutation(out_features, derive_seed(seed, 1))
        cols = seeded_permutation(in_features, derive_seed(seed, 2))
        self.row_offset = (rows * in_features) % code_dim  # a_o
        self.col_offset = cols % code_dim  # b_c
        self._spectrum_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def bucket_index(self) -> torch.Tensor:
        return (self.row_offset[:, None] + self.col_offset[None, :]) % self.code_dim

    def counts(self) -> torch.Tensor:
        positions = self.out_features * self.in_features
        base, extra = divmod(positions, self.code_dim)
        counts = torch.full((self.code_dim,), float(base), dtype=torch.float64)
        counts[:extra] += 1.0
        return counts

    def _offsets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, torch.int64)
        if key not in self._spectrum_cache:
            self._spectrum_cache[key] = (self.row_offset.to(device), self.col_offset.to(device))
        return self._spectrum_cache[key]

    def apply(self, inputs: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        rows, cols = self._offsets(inputs.device)
        compute = torch.float64 if inputs.dtype == torch.float64 else torch.float32
        means = code.to(compute) / self.counts().to(device=inputs.device, dtype=compute).sqrt()
        pooled = torch.zeros(inputs.shape[0], self.code_dim, dtype=compute, device=inputs.device)
        pooled.index_add_(1, cols, inputs.to(compute))
        spectrum = torch.fft.rfft(means) * torch.conj(torch.fft.rfft(pooled, dim=-1))
        correlation = torch.fft.irfft(spectrum, n=self.code_dim, dim=-1)
        return correlation[:, rows].to(inputs.dtype)


class BlockProjection(ResidualProjection):
    """Column blocks per row: h(o, c) = o * nb + blk(c); applied as a pooled matmul U (pool x).

    `residual="blocks"` uses contiguous blocks; `residual="fit"` uses a data-chosen partition (the input columns
    that carry the most activation-weighted residual energy get a block each, the rest share the last block).
    """

    def __init__(self, out_features: int, in_features: int, block_of_column: torch.Tensor) -> None:
        block_of_column = torch.as_tensor(block_of_column, dtype=torch.int64)
        blocks = int(block_of_column.max()) + 1 if block_of_column.numel() else 0
        if block_of_column.shape != (in_features,) or int(block_of_column.min()) < 0 or blocks > in_features:
            raise ValueError(f"invalid column partition for {in_features} input columns")
        self.block_sizes = torch.bincount(block_of_column, minlength=blocks).to(torch.float64)
        if (self.block_sizes == 0).any():
            raise ValueError("every block of a residual column partition must hold at least one column")
        self.out_features, self.in_features, self.blocks_per_row = out_features, in_features, blocks
        self.code_dim = out_features * blocks
        self.block_of_column = block_of_column

    @classmethod
    def contiguous(cls, out_features: int, in_features: int, blocks_per_row: int) -> BlockProjection:
        """`nb` contiguous blocks of (almost) equal width per row."""
        if not 1 <= blocks_per_row <= in_features:
            raise ValueError(f"blocks per row must be in [1, {in_features}]; got {blocks_per_row}")
        return cls(out_features, in_features, torch.arange(in_features) * blocks_per_row // in_features)

    @classmethod
    def selected(cls, out_features: int, in_features: int, columns: torch.Tensor) -> BlockProjection:
        """A block for each listed column (in order), plus one block pooling all other columns (if any)."""
        columns = torch.as_tensor(columns, dtype=torch.int64)
        block_of_column = torch.full((in_features,), len(columns), dtype=torch.int64)
        block_of_column[columns] = torch.arange(len(columns))
        return cls(out_features, in_features, block_of_column)

    @staticmethod
    def blocks_for_budget(out_features: int, in_features: int, code_budget: int) -> int:
        """The most blocks per row whose code (out * nb numbers) fits in `code_budget` (0: none fits)."""
        return min(in_features, code_budget // out_features)

    def bucket_index(self) -> torch.Tensor:
        return torch.arange(self.out_features)[:, None] * self.blocks_per_row + self.block_of_column[None, :]

    def counts(self) -> torch.Tensor:
        return self.block_sizes.repeat(self.out_features)

    def pool(self, inputs: torch.Tensor) -> torch.Tensor:
        """Sum the input columns of each block: (T, in) -> (T, nb)."""
        pooled = torch.zeros(inputs.shape[0], self.blocks_per_row, dtype=inputs.dtype, device=inputs.device)
        return pooled.index_add_(1, self.block_of_column.to(inputs.device), inputs)

    def apply(self, inputs: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if inputs.dtype == torch.float64 else torch.float32
        means = code.to(compute).view(self.out_features, self.blocks_per_row)
        means = means / self.block_sizes.to(device=inputs.device, dtype=compute).sqrt()
        return (self.pool(inputs.to(compute)) @ means.T).to(inputs.dtype)


def hash_code_dim(out_features: int, in_features: int, fraction: float) -> int:
    """Code length per expert for `residual="hash"`: an FFT-friendly size within `fraction` of out*in."""
    return fft_friendly_size(math.floor(fraction * out_features * in_features + 1e-9))


def make_projection(
    kind: str,
    out_features: int,
    in_features: int,
    code_dim: int,
    seed: int = 0,
    columns: torch.Tensor | None = None,
) -> ResidualProjection:
    """Rebuild the projection of a stored residual from its kind, shape, code length and seed / selected columns."""
    if kind == "hash":
        return HashProjection(out_features, in_features, code_dim, seed)
    if kind in ("blocks", "fit"):
        if code_dim % out_features:
            raise ValueError(f"block residual code length {code_dim} is not a multiple of the {out_features} rows")
        if kind == "fit":
            if columns is None:
                raise ValueError("a fitted residual needs its selected columns")
            return BlockProjection.selected(out_features, in_features, columns)
        return BlockProjection.contiguous(out_features, in_features, code_dim // out_features)
    raise ValueError(f"unknown residual kind {kind!r}")


def selected_columns_count(code_dim: int, out_features: int, in_features: int) -> int:
    """Columns a `fit` residual selects: one block each, plus the pooled block when columns are left over."""
    blocks = code_dim // out_features
    return blocks if blocks >= in_features else blocks - 1
