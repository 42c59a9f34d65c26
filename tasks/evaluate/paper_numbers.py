"""The GoldiCLIP paper's own numbers for its 30M model (arXiv 2603.24804), to publish beside ours.

All in percent, keyed by our evaluation formats (EvalDatasetConfig.format) and metric names.
"conditioned" is GoldiCLIP as the paper's main tables report it (text-conditioned image
representation); "agnostic" is GoldiCLIP_ta, the same model scored with v_g (supplementary sec. 9).

- table 1 (a, b, c): retrieval, GoldiCLIP row of data size 30M; table 8 (supplementary): GoldiCLIP_ta row.
- table 2: Retrieval-VQA T2I R@2 per question type; table 9 (supplementary): GoldiCLIP_ta row.
- table 3: zero-shot segmentation mIoU (text-conditioned pooling without the attention sink).
- table 4: zero-shot classification top-1.
"""

RETRIEVAL = {  # format -> metric -> percent
    "conditioned": {  # table 1
        "coco": {"t2i_R@1": 55.5, "t2i_R@5": 78.9, "i2t_R@1": 70.3, "i2t_R@5": 89.3},
        "flickr30k": {"t2i_R@1": 83.0, "t2i_R@5": 95.9, "i2t_R@1": 94.8, "i2t_R@5": 99.1},
        "docci": {"t2i_R@1": 27.0, "i2t_R@1": 60.2},
        "iiw": {"t2i_R@1": 44.0, "i2t_R@1": 90.9},
        "dci": {"t2i_R@1": 71.9, "i2t_R@1": 67.5},
        "urban1k": {"t2i_R@1": 88.6, "i2t_R@1": 83.2},
    },
    "agnostic": {  # table 8
        "coco": {"t2i_R@1": 52.3, "t2i_R@5": 77.2, "i2t_R@1": 67.7, "i2t_R@5": 88.0},
        "flickr30k": {"t2i_R@1": 80.3, "t2i_R@5": 95.0, "i2t_R@1": 93.2, "i2t_R@5": 99.2},
        "docci": {"t2i_R@1": 22.9, "i2t_R@1": 55.0},
        "iiw": {"t2i_R@1": 38.5, "i2t_R@1": 89.2},
        "dci": {"t2i_R@1": 69.2, "i2t_R@1": 65.9},
        "urban1k": {"t2i_R@1": 85.8, "i2t_R@1": 83.0},
    },
}

RVQA_TYPES = ("count", "color", "attribute", "shape", "relation")  # table 2's columns, in its order
RVQA = {  # question type -> R@2; "average" is the mean of the five types
    "conditioned": {"count": 66.8, "color": 48.5, "attribute": 51.5, "shape": 56.4, "relation": 55.9,
                    "average": 55.8},  # table 2
    "agnostic": {"count": 65.5, "color": 46.9, "attribute": 48.8, "shape": 55.0, "relation": 54.5,
                 "average": 54.1},  # table 9
}

SEGMENTATION = {"voc20": 70.0, "cityscapes": 28.9, "context59": 29.5, "ade20k": 16.4, "coco_stuff": 19.4,
                "average": 32.8}  # table 3, mIoU

CLASSIFICATION = {"food101": 74.0, "cifar10": 92.9, "cifar100": 70.7, "sun397": 67.2, "cars": 34.5,
                  "aircraft": 6.6, "dtd": 33.9, "pets": 62.7, "flowers102": 51.4, "imagenet": 57.4,
                  "average": 55.1}  # table 4, top-1
