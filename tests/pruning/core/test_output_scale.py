"""BatchNorm-aware weighting: which BatchNorm reads a layer's output, and by how much it scales it."""
import torch
from torch import nn

from camphive.pruning.core.calibration import CalibrationInfo
from camphive.pruning.core.output_scale import batchnorm_output_scale, normalizing_batchnorms
from camphive.pruning.core.unit_curvature import unit_matrix
from camphive.pruning.criteria.camp_hive import CampHive


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)  # read by ReLU first: not normalised directly
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 16, 5)
        self.bn3 = nn.BatchNorm1d(5, affine=False)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(torch.relu(self.conv2(x)))
        return self.bn3(self.fc(x.flatten(1)))


def _net():
    torch.manual_seed(0)
    net = Net()
    for norm in (net.bn1, net.bn2, net.bn3):
        norm.running_var.uniform_(0.2, 3.0)
    net.bn1.weight.data.uniform_(-2.0, 2.0)
    return net


def test_batchnorms_that_read_a_layer_output_directly_are_found():
    net = _net()
    layers = {"conv1.weight": "conv1", "conv2.weight": "conv2", "fc.weight": "fc"}
    found = normalizing_batchnorms(net, torch.randn(2, 1, 4, 4), layers)
    assert found == {"conv1.weight": net.bn1, "fc.weight": net.bn3}
    assert net.training  # the training flag is restored
    expected = net.bn1.weight.detach() ** 2 / (net.bn1.running_var + net.bn1.eps)
    assert torch.allclose(batchnorm_output_scale(net.bn1), expected)
    assert torch.allclose(batchnorm_output_scale(net.bn3), 1.0 / (net.bn3.running_var + net.bn3.eps))


def test_batchnorm_weighting_multiplies_each_units_reconstruction_scores():
    net = _net().eval()
    batches = [(torch.randn(8, 1, 4, 4), torch.randint(0, 5, (8,)))]
    params = {name: p for name, p in net.named_parameters() if name in ("conv1.weight", "conv2.weight", "fc.weight")}
    plain = CampHive().scores(CalibrationInfo(net, batches, params))
    weighted = CampHive(loss_weighting="batchnorm").scores(CalibrationInfo(net, batches, params))
    scale = {"conv1.weight": batchnorm_output_scale(net.bn1), "conv2.weight": torch.ones(3),
             "fc.weight": batchnorm_output_scale(net.bn3)}
    for name in params:
        expected = unit_matrix(plain[name]) * scale[name][:, None]
        assert torch.allclose(unit_matrix(weighted[name]), expected, rtol=1e-5), name
