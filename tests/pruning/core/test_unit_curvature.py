"""ReconstructionCurvature's gathers: the same entries as indexing each unit's matrix by hand."""
import torch

from camphive.pruning.core.unit_curvature import ReconstructionCurvature


def _curvature(groups: int, fan_in: int = 12) -> ReconstructionCurvature:
    generator = torch.Generator().manual_seed(groups)
    factors = torch.randn(groups, fan_in, 3 * fan_in, generator=generator, dtype=torch.float64)
    return ReconstructionCurvature({"layer.weight": factors @ factors.transpose(1, 2)}, damping=0.01)


def test_gathers_match_per_unit_indexing_with_and_without_groups():
    for groups in (1, 4):
        curvature, out_units, fan_in = _curvature(groups), 8, 12
        generator = torch.Generator().manual_seed(0)
        rows = torch.tensor([0, 3, 5, 7])
        cols = torch.stack([torch.randperm(fan_in, generator=generator)[:5] for _ in rows])
        matrices = curvature._matrices["layer.weight"]
        inverse = curvature._inverse("layer.weight")
        for row, picked, sub, inv_sub, unit_rows in zip(
                rows, cols, curvature.submatrices("layer.weight", out_units, rows, cols),
                curvature.inverse_submatrices("layer.weight", out_units, rows, cols),
                curvature.unit_rows("layer.weight", out_units, rows, cols)):
            group = int(row) // (out_units // groups)
            assert torch.equal(sub, matrices[group][picked][:, picked])
            assert torch.equal(inv_sub, inverse[group][picked][:, picked])
            assert torch.equal(unit_rows, matrices[group][picked])
