"""Dense baselines: train the small CNN and resnet20 on Fashion-MNIST; accuracy and time per epoch.

Each epoch is timed on its own and evaluated on the full test set, so the table shows how
accuracy grows with the budget (the pruning benchmarks start from these models). Appends a
section to benchmarks/RESULTS.md unless --no-write.

    python benchmarks/dense.py --models small-cnn,resnet20 --epochs 4 --threads 2
"""
from __future__ import annotations

import argparse

import torch
from common import publish, test_batches

from camphive import data, models
from camphive.measure import count_macs, count_parameters
from camphive.training import EpochRecord, train


def run_model(name: str, dataset: str, epochs: int, lr: float, train_subset: int | None,
              seed: int) -> list[dict]:
    torch.manual_seed(seed)
    train_set = data.load(dataset, split="train")
    test = test_batches(dataset)
    model = models.create(name, num_classes=train_set.num_classes, in_channels=train_set.input_shape[0])
    loader = data.loader(train_set, batch_size=128, train=True, seed=seed, subset=train_subset,
                         random_subset=train_subset is not None)
    example = torch.zeros(1, *train_set.input_shape)
    macs, params = count_macs(model, example).total, count_parameters(model)
    rows = []

    def record(epoch: EpochRecord, state) -> None:
        # seconds: training only; the evaluation of the test set after each epoch is not counted.
        rows.append({"model": name, "epoch": epoch.epoch, "seconds": epoch.seconds, "train_loss": epoch.train_loss,
                     "accuracy": epoch.test_accuracy, "loss": epoch.test_loss, "macs": macs, "params": params})
        print(f"{name} epoch {epoch.epoch}/{epochs}: {epoch.seconds:.0f} s, test accuracy {epoch.test_accuracy:.4f}",
              flush=True)

    train(model, loader, epochs, lr=lr, device="cpu", seed=seed, eval_data=test, on_epoch_end=record)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | params | MACs | epoch | s/epoch | train loss | test accuracy | test loss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['params'] / 1e3:.0f} k | {row['macs'] / 1e6:.2f} M | {row['epoch']} | "
                     f"{row['seconds']:.0f} | {row['train_loss']:.4f} | {row['accuracy']:.4f} | {row['loss']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small-cnn,resnet20")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-subset", type=int, default=None, help="train on N random images per epoch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args.dataset, args.epochs, args.lr, args.train_subset, args.seed)
    body = (f"{args.dataset}, SGD lr {args.lr} (cosine over {args.epochs} epochs), batch 128, "
            f"{'all' if args.train_subset is None else args.train_subset} training images per epoch, seed {args.seed}; "
            f"test accuracy on the full test set after each epoch.\n\n{table(rows)}")
    publish(f"Dense training: {', '.join(args.models.split(','))} on {args.dataset}", body, write=not args.no_write)


if __name__ == "__main__":
    main()
