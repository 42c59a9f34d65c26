"""The paper-style tables: our metrics in the paper's columns, the paper's 30M rows beside them."""

from __future__ import annotations

from tasks.config import EvalDatasetConfig
from tasks.evaluate import paper_numbers
from tasks.evaluate.report import paper_tables


def _rows(markdown: str, title: str) -> dict[str, list[str]]:
    """Label -> cells of the table whose bold title starts with `title`."""
    block = markdown.split(f"**{title}")[1].split("**")[1]  # from the end of the title to the next one
    rows = [line.strip("|").split("|") for line in block.splitlines() if line.startswith("| ")
            and not line.startswith("| |")]  # the header row has no label
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def _sets(*pairs):
    return [EvalDatasetConfig(name=name, format=fmt, path="/x", images="/x") for name, fmt in pairs]


def test_retrieval_columns_modes_and_the_paper_rows():
    metrics = {"coco5k/conditioned/t2i_R@1": 0.5, "coco5k/conditioned/i2t_R@5": 0.25, "coco5k/agnostic/t2i_R@1": 0.125,
               "coco5k/rerank_top10/t2i_R@1": 0.375, "coco5k/chance/t2i_R@1": 0.0002,
               "other_coco/conditioned/t2i_R@1": 0.99}
    table = _rows(paper_tables(metrics, _sets(("coco5k", "coco"), ("other_coco", "coco"))), "Table 1a")
    # Columns: MSCOCO T2I R@1, T2I R@5, I2T R@1, I2T R@5, then Flickr30k's four (no set: "-").
    assert table["GoldiCLIP 30M, paper (table 1)"] == ["55.5", "78.9", "70.3", "89.3", "83.0", "95.9", "94.8", "99.1"]
    assert table["ours, text-conditioned"] == ["50.0", "-", "-", "25.0", "-", "-", "-", "-"]  # the first coco set
    assert table["GoldiCLIP_ta 30M, paper (table 8)"][:2] == ["52.3", "77.2"]
    assert table["ours, text-agnostic"][0] == "12.5"
    assert table["ours, rerank_top10"][0] == "37.5" and "ours, chance" not in table
    assert list(table)[:4] == ["GoldiCLIP 30M, paper (table 1)", "ours, text-conditioned",
                               "GoldiCLIP_ta 30M, paper (table 8)", "ours, text-agnostic"]


def test_rvqa_types_segmentation_and_classification_averages():
    metrics = {"vg/conditioned/count_R@2": 0.6, "vg/conditioned/color_R@2": 0.4,
               "vg/conditioned/object_attributes_R@2": 0.5, "vg/conditioned/average_R@2": 0.5}
    metrics |= {f"{fmt}/conditioned/mIoU": value for fmt, value in
                [("voc20", 0.7), ("cityscapes", 0.3), ("context59", 0.3), ("ade20k", 0.2), ("coco_stuff", 0.0)]}
    metrics |= {"imagenet/agnostic/top1": 0.574, "cifar10/agnostic/top1": 0.9}
    sets = _sets(("vg", "rvqa"), ("voc20", "voc20"), ("cityscapes", "cityscapes"), ("context59", "context59"),
                 ("ade20k", "ade20k"), ("coco_stuff", "coco_stuff"), ("imagenet", "imagenet"), ("cifar10", "cifar10"))
    markdown = paper_tables(metrics, sets)
    rvqa = _rows(markdown, "Table 2")
    assert rvqa["GoldiCLIP 30M, paper (table 2)"] == ["66.8", "48.5", "51.5", "56.4", "55.9", "55.8"]
    assert rvqa["ours, text-conditioned"] == ["60.0", "40.0", "50.0", "-", "-", "50.0"]  # "attribute" in its type name
    segmentation = _rows(markdown, "Table 3")
    assert segmentation["ours, text-conditioned"] == ["70.0", "30.0", "30.0", "20.0", "0.0", "30.0"]
    assert segmentation["GoldiCLIP 30M, paper (table 3)"][-1] == "32.8"
    classification = _rows(markdown, "Table 4")
    assert classification["ours, text-agnostic"][1] == "90.0" and classification["ours, text-agnostic"][9] == "57.4"
    assert classification["ours, text-agnostic"][-1] == "-"  # 8 of the 10 datasets missing: no average
    assert "Ours from sets: imagenet = `imagenet`" not in markdown and "imagenet = `imagenet`" in markdown


def test_the_paper_s_averages_are_the_means_of_its_columns():
    # Tables 2, 3 and 4 print an average; each is the mean of the row's columns (to rounding).
    for row in paper_numbers.RVQA.values():
        assert abs(sum(row[k] for k in paper_numbers.RVQA_TYPES) / 5 - row["average"]) < 0.05
    for numbers in (paper_numbers.SEGMENTATION, paper_numbers.CLASSIFICATION):
        values = [v for k, v in numbers.items() if k != "average"]
        assert abs(sum(values) / len(values) - numbers["average"]) < 0.05
