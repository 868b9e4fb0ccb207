"""Curvature of the loss and of layer reconstructions, as linear operators.

* :class:`HessianOperator`: exact Hessian-vector products of the mean calibration loss.
* :func:`top_eigenpairs`: power iteration with deflation, Lanczos, or scipy's eigsh on any operator.
* :func:`hutchinson_diagonal`, :func:`hutchinson_trace`: Rademacher-probe estimators.
* :func:`layer_input_covariances`: the layer-wise reconstruction curvature G = E[x x^T].
* :func:`spectrum`, :func:`plot_convergence`: the spectrum report.
"""
from camphive.curvature.eigen import DEFAULT_EIGEN_METHOD, EIGEN_METHODS, EigenResult, top_eigenpairs
from camphive.curvature.hutchinson import DiagonalEstimate, TraceEstimate, hutchinson_diagonal, hutchinson_trace
from camphive.curvature.hvp import DEFAULT_HVP_METHOD, HVP_METHODS, HessianOperator
from camphive.curvature.operators import BlockDiagonalOperator, DenseOperator, LinearOperatorBase, as_scipy_operator
from camphive.curvature.reconstruction import (
    LayerCovariance,
    layer_input_covariances,
    layer_input_rows,
    reconstruction_loss,
    weight_rows,
)
from camphive.curvature.spectrum import SpectrumResult, plot_convergence, spectrum

__all__ = [
    "DEFAULT_EIGEN_METHOD",
    "DEFAULT_HVP_METHOD",
    "EIGEN_METHODS",
    "HVP_METHODS",
    "BlockDiagonalOperator",
    "DenseOperator",
    "DiagonalEstimate",
    "EigenResult",
    "HessianOperator",
    "LayerCovariance",
    "LinearOperatorBase",
    "SpectrumResult",
    "TraceEstimate",
    "as_scipy_operator",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "layer_input_covariances",
    "layer_input_rows",
    "plot_convergence",
    "reconstruction_loss",
    "spectrum",
    "top_eigenpairs",
    "weight_rows",
]
