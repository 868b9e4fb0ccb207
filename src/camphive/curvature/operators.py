"""Symmetric linear operators on flat vectors, and what every operator gets for free.

The eigen-solvers and estimators take any object with ``dim``, ``dtype``, ``device`` and
``matvec(v) -> Hv`` (1-D tensors of length ``dim``); ``matmat`` is used when present.
:class:`LinearOperatorBase` supplies the counter, ``matmat`` by columns, ``to_dense`` and the
scipy view, so a new operator only writes ``_matvec``.
"""
from __future__ import annotations

import numpy as np
import torch

from camphive.errors import ConfigError

DENSE_LIMIT = 8192  # to_dense is for tests and tiny problems: dim^2 entries, dim products


def operator_dtype(operator) -> torch.dtype:
    return getattr(operator, "dtype", torch.get_default_dtype())


def operator_device(operator) -> torch.device:
    return torch.device(getattr(operator, "device", "cpu"))


class LinearOperatorBase:
    """Counting, shape checks, ``matmat``, ``to_dense`` and ``as_linear_operator`` for subclasses.

    ``num_matvecs`` counts vectors multiplied (a ``matmat`` with ``k`` columns adds ``k``).
    """

    dim: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self) -> None:
        self.num_matvecs = 0

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """``(dim, k) -> (dim, k)``; subclasses with a cheaper batched path override this."""
        return torch.stack([self._matvec(column) for column in matrix.T], dim=1)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``H @ vector`` for a 1-D tensor of length ``dim`` (moved to the operator's device and dtype)."""
        vector = self._check(vector, ndim=1)
        result = self._matvec(vector)
        self.num_matvecs += 1
        return result

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """``H @ matrix`` for a ``(dim, k)`` tensor."""
        matrix = self._check(matrix, ndim=2)
        result = self._matmat(matrix)
        self.num_matvecs += matrix.shape[1]
        return result

    def _check(self, tensor: torch.Tensor, ndim: int) -> torch.Tensor:
        tensor = torch.as_tensor(tensor)
        if tensor.ndim != ndim or tensor.shape[0] != self.dim:
            expected = f"({self.dim},)" if ndim == 1 else f"({self.dim}, k)"
            raise ConfigError(
                f"{type(self).__name__} got a tensor of shape {tuple(tensor.shape)}, expected {expected}; "
                "pass flat vectors laid out like the operator's parameters"
            )
        return tensor.to(device=self.device, dtype=self.dtype)

    def to_dense(self, max_dim: int = DENSE_LIMIT) -> torch.Tensor:
        """The full ``(dim, dim)`` matrix, column by column (``dim`` products): for tiny problems."""
        if self.dim > max_dim:
            raise ConfigError(
                f"to_dense on an operator of dimension {self.dim} would need {self.dim} products and "
                f"{self.dim}^2 entries; it is meant for dim <= {max_dim} (raise max_dim if you mean it)"
            )
        return self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64, symmetric) over this operator."""
        return as_scipy_operator(self)


def as_scipy_operator(operator):
    """Wrap any operator with ``dim``/``matvec`` as a float64 scipy ``LinearOperator``."""
    from scipy.sparse.linalg import LinearOperator

    dtype, device = operator_dtype(operator), operator_device(operator)

    def to_torch(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(device=device, dtype=dtype)

    def matvec(array: np.ndarray) -> np.ndarray:
        product = operator.matvec(to_torch(np.ravel(array)))
        return product.detach().to(device="cpu", dtype=torch.float64).numpy()

    def matmat(array: np.ndarray) -> np.ndarray:
        if hasattr(operator, "matmat"):
            product = operator.matmat(to_torch(array))
            return product.detach().to(device="cpu", dtype=torch.float64).numpy()
        return np.stack([matvec(column) for column in np.asarray(array).T], axis=1)

    shape = (operator.dim, operator.dim)
    return LinearOperator(shape, matvec=matvec, rmatvec=matvec, matmat=matmat, dtype=np.float64)


class DenseOperator(LinearOperatorBase):
    """A symmetric matrix as an operator: the reference that makes solver tests exact.

    ``matrix`` is ``(dim, dim)``; only its symmetric part matters to the solvers, so it is
    symmetrised on construction.
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ConfigError(f"DenseOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = (matrix + matrix.T) / 2
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self.matrix @ vector

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.matrix @ matrix


class BlockDiagonalOperator(LinearOperatorBase):
    """Operators on consecutive slices of one flat vector, with zero coupling between slices."""

    def __init__(self, blocks: list) -> None:
        super().__init__()
        if not blocks:
            raise ConfigError("a block-diagonal operator needs at least one block")
        self.blocks = list(blocks)
        self.sizes = [int(block.dim) for block in self.blocks]
        self.dim = sum(self.sizes)
        self.dtype = operator_dtype(self.blocks[0])
        self.device = operator_device(self.blocks[0])

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(vector, self.sizes)
        return torch.cat([block.matvec(piece) for block, piece in zip(self.blocks, pieces)])

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(matrix, self.sizes, dim=0)
        return torch.cat([_matmat_of(block, piece) for block, piece in zip(self.blocks, pieces)], dim=0)


def _matmat_of(operator, matrix: torch.Tensor) -> torch.Tensor:
    if hasattr(operator, "matmat"):
        return operator.matmat(matrix)
    return torch.stack([operator.matvec(column) for column in matrix.T], dim=1)
