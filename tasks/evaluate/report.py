"""Our metrics laid out as the paper's tables 1-4, with the paper's 30M GoldiCLIP rows beside them.

Each table has the paper's columns (table 1 in its three groups a, b, c); a column is filled from
the first configured evaluation set of its format (`EvalDatasetConfig.format`), in percent. Rows:
the paper's GoldiCLIP (text-conditioned), ours text-conditioned, and for retrieval and RVQA the
paper's GoldiCLIP_ta (text-agnostic, supplementary tables 8 and 9) and ours text-agnostic, then
any other mode of ours (the re-rank) without a paper row. Classification is text-agnostic and
segmentation text-conditioned, as in the paper. "-": no set of that format, or a metric not
computed; an average only when all its columns are there.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks.config import EvalDatasetConfig
from tasks.evaluate import paper_numbers as paper

Row = tuple[str, list[float | None]]
RECALL_HEADERS = {"t2i_R@1": "T2I R@1", "t2i_R@5": "T2I R@5", "i2t_R@1": "I2T R@1", "i2t_R@5": "I2T R@5"}
TABLE_1 = [  # (title, [(format, column title)], recalls)
    ("Table 1a: standard retrieval (%)", [("coco", "MSCOCO"), ("flickr30k", "Flickr30k")],
     ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5")),
    ("Table 1b: fine-grained retrieval (%)", [("docci", "DOCCI-FG"), ("iiw", "IIW-FG")], ("t2i_R@1", "i2t_R@1")),
    ("Table 1c: long-text retrieval, 77-token context (%)", [("dci", "DCI"), ("urban1k", "Urban1k")],
     ("t2i_R@1", "i2t_R@1")),
]
SEGMENTATION_COLUMNS = [("voc20", "VOC20"), ("cityscapes", "Cityscapes"), ("context59", "Context59"),
                        ("ade20k", "ADE20K"), ("coco_stuff", "COCO-Stuff")]
CLASSIFICATION_COLUMNS = [("food101", "Food-101"), ("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"),
                          ("sun397", "SUN397"), ("cars", "Cars"), ("aircraft", "Aircraft"), ("dtd", "DTD"),
                          ("pets", "Pets"), ("flowers102", "Flowers"), ("imagenet", "ImageNet")]
PAPER_MODES = {"conditioned": ("GoldiCLIP", "text-conditioned"), "agnostic": ("GoldiCLIP_ta", "text-agnostic")}


def _markdown(title: str, headers: list[str], rows: list[Row], note: str) -> str:
    lines = [f"**{title}**", "", "| | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in values) + " |"
              for label, values in rows]
    return "\n".join(lines + ["", note, ""])


def _with_average(values: list[float | None]) -> list[float | None]:
    return values + [None if None in values else sum(values) / len(values)]


class _Ours:
    """Our numbers in percent; the first set of each format stands for it."""

    def __init__(self, metrics: dict[str, float], datasets: Sequence[EvalDatasetConfig]):
        self.metrics = metrics
        self.set_of_format: dict[str, str] = {}
        for dataset in datasets:
            self.set_of_format.setdefault(dataset.format, dataset.name)

    def value(self, fmt: str, mode: str, metric: str) -> float | None:
        value = self.metrics.get(f"{self.set_of_format.get(fmt)}/{mode}/{metric}")
        return None if value is None else 100 * value

    def rvqa(self, mode: str, kind: str) -> float | None:
        """R@2 of the first question type whose name holds `kind` (RetVQA may spell it "object_attributes")."""
        prefix, suffix = f"{self.set_of_format.get('rvqa')}/{mode}/", "_R@2"
        for key, value in self.metrics.items():
            if key.startswith(prefix) and key.endswith(suffix) and kind in key[len(prefix):-len(suffix)]:
                return 100 * value
        return None

    def other_modes(self, formats: Sequence[str]) -> list[str]:
        """Modes of ours without a paper row (the re-rank) that these formats' sets have metrics in."""
        names = {self.set_of_format[f] for f in formats if f in self.set_of_format}
        modes = {key.split("/")[1] for key in self.metrics if key.split("/")[0] in names}
        return sorted(modes - set(PAPER_MODES) - {"chance"})

    def note(self, formats: Sequence[str]) -> str:
        used = [f"{f} = `{self.set_of_format[f]}`" for f in formats if f in self.set_of_format]
        return "Ours from sets: " + (", ".join(used) if used else "none configured") + "."


def _two_mode_rows(paper_row, ours_row, tables: tuple[str, str], extra_modes: list[str]) -> list[Row]:
    """Paper then ours for each of the paper's modes (its tables `tables`), then ours in the other modes."""
    rows = []
    for (mode, (model, mode_name)), table in zip(PAPER_MODES.items(), tables):
        rows += [(f"{model} 30M, paper (table {table})", paper_row(mode)), (f"ours, {mode_name}", ours_row(mode))]
    return rows + [(f"ours, {mode}", ours_row(mode)) for mode in extra_modes]


def paper_tables(metrics: dict[str, float], datasets: Sequence[EvalDatasetConfig]) -> str:
    """Markdown: tables 1a-c, 2, 3 and 4, the paper's rows and ours."""
    ours = _Ours(metrics, datasets)
    out = []
    for title, formats, recalls in TABLE_1:
        headers = [f"{name} {RECALL_HEADERS[r]}" for _, name in formats for r in recalls]
        cells = [(fmt, r) for fmt, _ in formats for r in recalls]
        rows = _two_mode_rows(lambda mode: [paper.RETRIEVAL[mode][f].get(r) for f, r in cells],
                              lambda mode: [ours.value(f, mode, r) for f, r in cells],
                              ("1", "8"), ours.other_modes([f for f, _ in formats]))
        out.append(_markdown(title, headers, rows, ours.note([f for f, _ in formats])))

    kinds = [*paper.RVQA_TYPES, "average"]
    rows = _two_mode_rows(lambda mode: [paper.RVQA[mode][k] for k in kinds],
                          lambda mode: [ours.rvqa(mode, k) for k in paper.RVQA_TYPES]
                          + [ours.value("rvqa", mode, "average_R@2")], ("2", "9"), [])
    out.append(_markdown("Table 2: Retrieval-VQA, T2I R@2 (%)", [k.capitalize() for k in kinds], rows,
                         ours.note(["rvqa"])))

    for title, columns, numbers, metric, mode, table in [
            ("Table 3: zero-shot segmentation, mIoU (%)", SEGMENTATION_COLUMNS, paper.SEGMENTATION, "mIoU",
             "conditioned", "3"),
            ("Table 4: zero-shot classification, top-1 (%)", CLASSIFICATION_COLUMNS, paper.CLASSIFICATION, "top1",
             "agnostic", "4")]:
        rows = [(f"GoldiCLIP 30M, paper (table {table})", [numbers[f] for f, _ in columns] + [numbers["average"]]),
                (f"ours, {PAPER_MODES[mode][1]}", _with_average([ours.value(f, mode, metric) for f, _ in columns]))]
        out.append(_markdown(title, [name for _, name in columns] + ["Average"], rows,
                             ours.note([f for f, _ in columns])))
    return "\n".join(out)
