"""mIoU of semantic segmentation, as mmsegmentation's `IoUMetric` computes it (paper sec. 4.6, table 3).

A confusion matrix is accumulated over the whole dataset (pixels labelled `IGNORE_INDEX`, or any
value that is not a class, left out, as mmsegmentation's histogram over the class range does),
then per class IoU = TP / (TP + FP + FN); a class absent from both the labels and the predictions
of every image has no IoU (NaN) and is left out of the mean, as `nanmean` does there.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = 255


def confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, row = label, column = prediction, over pixels labelled with a class."""
    valid = label < num_classes
    index = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def segmentation_scores(matrix: torch.Tensor) -> dict[str, float]:
    """{"mIoU": mean IoU over classes that occur, "aAcc": pixel accuracy} of a confusion matrix."""
    true_positive = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - true_positive
    iou = true_positive / union  # NaN where a class never occurs (0 / 0)
    return {"mIoU": iou.nanmean().item(), "aAcc": (true_positive.sum() / matrix.sum()).item()}
