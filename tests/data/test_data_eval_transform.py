import torch

from camphive import data


def test_eval_transform_on_the_train_split_is_deterministic_and_matches_the_test_pipeline():
    train_eval = data.load("synthetic", split="train", transform="eval", num_samples=8)
    train_auto = data.load("synthetic", split="train", num_samples=8)
    assert torch.equal(train_eval[3][0], train_eval[3][0])
    assert torch.equal(train_eval[3][0], train_auto[3][0])  # synthetic has no augmentation to drop
    assert train_eval[3][1] == train_auto[3][1]
