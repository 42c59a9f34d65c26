"""The paper's evaluation suite beyond COCO, Flickr30k, JSONL pairs and class folders (METHOD.md sec. 9).

One module per task family, each reading its datasets in the layout they ship in (or FLAIR's /
mmsegmentation's, where the protocol the paper follows reads those) from a local directory or an
fsspec URL, and evaluating them:

    retrieval_sets   DOCCI-FG, IIW-FG (fine-grained), DCI, Urban1k (long text)   paper sec. 4.4, table 1b/1c
    vqa_retrieval    Retrieval-VQA on Visual Genome, R@2 per question type        paper sec. 4.5, table 2
    segmentation     VOC20, Cityscapes, Context59, ADE20K, COCO-Stuff, mIoU       paper sec. 4.6, table 3
    classification   the paper's 10 zero-shot classification datasets            paper sec. 4.7, table 4
"""

from tasks.evaluate.sets import classification, retrieval_sets, segmentation, vqa_retrieval

SUITE_READERS = {**retrieval_sets.READERS, "rvqa": vqa_retrieval.read_rvqa,
                 **{fmt: segmentation.read_segmentation for fmt in segmentation.BENCHMARKS}, **classification.READERS}
