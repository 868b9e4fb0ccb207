import pytest
import torch
from torch import nn

import camphive
from camphive.errors import ConfigError, DataError, NumericalError
from camphive.training import evaluate, finetune, train


def _toy_problem(seed=0, samples=256, classes=4):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, 1, 6, 6, generator=generator) * 2
    labels = torch.randint(0, classes, (samples,), generator=generator)
    inputs = centers[labels] + 0.5 * torch.randn(samples, 1, 6, 6, generator=generator)
    return [(inputs[i : i + 32], labels[i : i + 32]) for i in range(0, samples, 32)]


def _toy_model(classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, classes))


def test_loss_falls_and_accuracy_rises():
    batches = _toy_problem()
    model = _toy_model()
    before = evaluate(model, batches)
    result = train(model, batches, epochs=3, lr=0.05, device="cpu")
    after = evaluate(model, batches)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert after["loss"] < before["loss"] * 0.5
    assert after["accuracy"] > 0.9


def test_masked_weights_stay_exactly_zero_with_momentum_and_weight_decay():
    batches = _toy_problem()
    model = _toy_model()
    generator = torch.Generator().manual_seed(1)
    masks = {name: torch.rand(p.shape, generator=generator) > 0.6
             for name, p in model.named_parameters() if p.ndim > 1}
    finetune(model, batches, epochs=2, masks=masks, lr=0.1, momentum=0.9, weight_decay=5e-3, device="cpu")
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.count_nonzero(parameters[name][~mask]) == 0
        assert torch.count_nonzero(parameters[name][mask]) == int(mask.sum())


def test_evaluate_reports_top5_only_with_more_than_five_classes():
    batches = _toy_problem(classes=4)
    metrics = evaluate(_toy_model(4), batches)
    assert metrics["top5"] is None and metrics["num_samples"] == 256
    wide = _toy_model(8)
    metrics = evaluate(wide, batches)
    assert 0.0 <= metrics["accuracy"] <= metrics["top5"] <= 1.0


def test_evaluate_restores_training_flag():
    model = _toy_model()
    model.train()
    evaluate(model, _toy_problem())
    assert model.training


def test_same_seed_same_result():
    first, second = _toy_model(), _toy_model()
    train(first, _toy_problem(), epochs=1, device="cpu", seed=3)
    train(second, _toy_problem(), epochs=1, device="cpu", seed=3)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_resume_matches_uninterrupted_run():
    batches = _toy_problem()
    full = _toy_model()
    train(full, batches, epochs=3, device="cpu", seed=2, lr=0.05)
    states = []
    part = _toy_model()
    train(part, batches, epochs=3, device="cpu", seed=2, lr=0.05,
          on_epoch_end=lambda record, state: states.append((state, {k: v.clone() for k, v in part.state_dict().items()})))
    resumed = _toy_model()
    state, weights = states[0]
    resumed.load_state_dict(weights)
    train(resumed, batches, epochs=3, device="cpu", seed=2, lr=0.05, state=state)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_labels_out_of_range_is_a_clear_error():
    batches = [(torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 9]))]
    with pytest.raises(DataError, match="labels .* range from 0 to 9 .* 4 outputs"):
        evaluate(_toy_model(4), batches)


def test_wrong_input_shape_is_a_clear_error():
    batches = [(torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3]))]
    with pytest.raises(DataError, match=r"inputs of shape \(4, 3, 6, 6\)"):
        train(_toy_model(4), batches, epochs=1, device="cpu")


def test_nan_loss_is_reported():
    model = _toy_model()
    with torch.no_grad():
        model[4].weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match="training loss is nan at epoch 1, batch 0"):
        train(model, _toy_problem(), epochs=1, device="cpu")


def test_bad_options():
    with pytest.raises(ConfigError):
        train(_toy_model(), _toy_problem(), epochs=1, schedule="weird", device="cpu")
    with pytest.raises(ConfigError):
        train(_toy_model(), _toy_problem(), epochs=1, lr=-1, device="cpu")
    with pytest.raises(DataError):
        train(_toy_model(), [], epochs=1, device="cpu")


def test_single_sample_batches_with_batchnorm_are_skipped_in_training():
    batches = _toy_problem()[:2] + [(torch.randn(1, 1, 6, 6), torch.tensor([0]))]
    train(_toy_model(), batches, epochs=1, device="cpu")


def test_public_api_exports():
    for name in ("train", "finetune", "evaluate", "models", "data", "prune", "export_onnx", "curvature"):
        assert hasattr(camphive, name)
