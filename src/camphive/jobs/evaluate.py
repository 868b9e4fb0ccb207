"""``camphive evaluate``: accuracy of a checkpoint on a dataset split.

Under torchrun each process evaluates its shard and the counts are summed, so the metrics are
those of one process; rank 0 alone writes ``out``.
"""
from __future__ import annotations

from pathlib import Path

from camphive import data as datasets
from camphive import distributed
from camphive.checkpoints import load_checkpoint
from camphive.jobs.common import check_input_shape, checkpoint_dataset
from camphive.pruning.unstructured.masks import sparsity_of
from camphive.training import evaluate


def evaluate_job(*, checkpoint: str | Path, dataset: str | None = None, data_root: str | None = None,
                 split: str = "test", batch_size: int = 256, subset: int | None = None,
                 device: str = "auto", out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Evaluate the model stored at ``checkpoint`` on ``dataset`` (default: the one it was trained on,
    with the options it was made with)."""
    from camphive.runs import RunFolder

    distributed.init_from_environment()
    stored = load_checkpoint(checkpoint)
    dataset, dataset_options = checkpoint_dataset(stored.metadata, dataset, checkpoint)
    data = datasets.load(dataset, root=data_root, split=split, **dataset_options)
    check_input_shape(stored.metadata, data, checkpoint, dataset)
    metrics = evaluate(stored.model, datasets.loader(data, batch_size=batch_size, subset=subset, device=device), device=device)
    metrics.update({"checkpoint": str(checkpoint), "dataset": dataset, "split": split})
    if stored.masks:
        metrics["sparsity"] = sparsity_of(stored.masks)[0]
    if out is not None:
        run = RunFolder.create(out, overwrite=overwrite)
        run.write_config({"command": "evaluate", "checkpoint": str(checkpoint), "dataset": dataset,
                          "dataset_options": dataset_options, "split": split, "subset": subset})
        run.write_json("metrics.json", metrics)
        distributed.barrier()
    return metrics
