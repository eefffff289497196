"""Datasets: loaders for real formats -> the canonical :class:`Dataset`, and splitters."""

from recsys.data.canonical import Dataset, read_dataset, write_dataset
from recsys.data.splits import (
    LeaveOneOutSplit,
    TimeSplit,
    leave_one_out,
    time_split,
    user_sequences,
)

__all__ = [
    "Dataset",
    "LeaveOneOutSplit",
    "TimeSplit",
    "leave_one_out",
    "read_dataset",
    "time_split",
    "user_sequences",
    "write_dataset",
]
