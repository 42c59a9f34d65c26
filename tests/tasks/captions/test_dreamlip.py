"""The DreamLIP CSV reader: streaming, bad rows counted (malformed, oversized), the URL join."""
from __future__ import annotations

import csv
from collections import Counter

import pytest

from storage.tables import CAPTIONERS
from storage.caption_partitions import DreamlipCaptions
from tasks.captions.dreamlip import DreamlipColumns, iter_dreamlip_rows, join_captions
from tests.tasks.captions.csv_rows import HEADER
from tests.tasks.captions.csv_rows import csv_text as _csv_text
from tests.tasks.captions.csv_rows import row as _row
from tests.tasks.captions.csv_rows import write as _write


def test_streams_rows_with_quoted_newlines_and_commas(tmp_path):
    path = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(5)]))
    counts = Counter()
    rows = list(iter_dreamlip_rows(path, counts=counts))
    assert [r.url for r in rows] == [f"http://x/{i}.jpg" for i in range(5)]
    assert rows[2] == DreamlipCaptions(
        url="http://x/2.jpg",
        raw="raw 2",
        short={c: f"short {c} 2, with a comma." for c in CAPTIONERS},
        long={c: f'Long {c} 2 first sentence.\nSecond sentence, "quoted".' for c in CAPTIONERS},
    )
    assert counts == Counter(rows=5)


def test_bad_rows_are_counted_not_fatal(tmp_path):
    text = _csv_text([_row(0)])
    text += "http://x/short.jpg,too,few\n"
    text += _csv_text([_row(1), [""] + _row(2)[1:], _row(3)]).split("\n", 1)[1]
    path = _write(tmp_path / "a.csv", text)
    counts = Counter()
    assert [r.url for r in iter_dreamlip_rows(path, counts=counts)] == ["http://x/0.jpg", "http://x/1.jpg", "http://x/3.jpg"]
    assert counts == Counter(rows=3, malformed_row=1, empty_url=1)


@pytest.mark.parametrize("where", ["middle", "last"])
def test_unterminated_quote_does_not_swallow_the_file(tmp_path, where):
    good = [_row(i) for i in range(40)]
    bad = 'http://x/bad.jpg,"raw caption that never closes its quote,a,b,c,d,e,f\n'
    lines = _csv_text(good).splitlines(keepends=True)
    head, body = lines[0], "".join(lines[1:])
    split = body.index("http://x/20.jpg")
    if where == "middle":
        text = head + body[:split] + bad + body[split:]
    else:
        text = head + body + bad
    counts = Counter()
    rows = list(iter_dreamlip_rows(_write(tmp_path / "a.csv", text), counts=counts, max_record_lines=30))
    assert [r.url for r in rows] == [f"http://x/{i}.jpg" for i in range(40)]
    assert rows[25].long["SV"] == 'Long SV 25 first sentence.\nSecond sentence, "quoted".'
    assert counts["malformed_row"] >= 1 and counts["rows"] == 40


def test_missing_required_column_is_a_value_error(tmp_path):
    header = [h for h in HEADER if h != "longSV_captions"]
    path = _write(tmp_path / "a.csv", _csv_text([], header=header))
    with pytest.raises(ValueError, match="longSV_captions"):
        list(iter_dreamlip_rows(path, counts=Counter()))


def test_configurable_column_names_and_extra_columns(tmp_path):
    columns = DreamlipColumns(url="url", raw="alt", short={"A": "s"}, long={"A": "l"})
    path = _write(tmp_path / "a.csv", "id,url,alt,s,l\n7,http://x/1.jpg,alt text,short,long one. long two.\n")
    (row,) = iter_dreamlip_rows(path, counts=Counter(), columns=columns)
    assert row == DreamlipCaptions("http://x/1.jpg", "alt text", {"A": "short"}, {"A": "long one. long two."})


def test_join_keeps_only_wanted_urls_across_files(tmp_path):
    a = _write(tmp_path / "a.csv", _csv_text([_row(i) for i in range(0, 10)]))
    b = _write(tmp_path / "b.csv", _csv_text([_row(i) for i in range(10, 20)] + [_row(3)]))
    counts = Counter()
    got = join_captions([a, b], {"http://x/3.jpg": "k3", "http://x/15.jpg": "k15", "http://x/99.jpg": "k99"}, counts=counts)
    assert set(got) == {"k3", "k15"}
    assert got["k15"].raw == "raw 15"
    assert set(join_captions([a, b], {"http://x/4.jpg"}, counts=Counter())) == {"http://x/4.jpg"}


@pytest.mark.parametrize("column", [1, 7])  # the raw caption, the last (LLaVA long) caption
def test_a_single_line_over_the_record_cap_is_an_oversized_row(tmp_path, column):
    """Issue 13 item 6: the cap holds for one long line whatever csv's process-wide field limit is."""
    huge = _row(1)
    huge[column] = "a very long caption " * 60_000  # 1.2 M characters on one line
    path = _write(tmp_path / "a.csv", _csv_text([_row(0), huge, _row(2)]))
    counts = Counter()
    limit = csv.field_size_limit(16 * 2**20)  # as a module imported first once set it for everyone
    try:
        rows = list(iter_dreamlip_rows(path, counts=counts))
    finally:
        csv.field_size_limit(limit)
    assert [r.url for r in rows] == ["http://x/0.jpg", "http://x/2.jpg"]
    assert counts == Counter(rows=2, oversized_row=1)


def test_records_up_to_the_cap_are_kept_and_a_field_over_it_is_oversized(tmp_path):
    long_ok = _row(1)
    long_ok[7] = "x" * 100_000  # under csv's 128 KiB field default and the 1 MiB record cap
    over = _row(2)
    over[7] = "y" * 3000
    path = _write(tmp_path / "a.csv", _csv_text([_row(0), long_ok, over, _row(3)]))
    counts = Counter()
    rows = list(iter_dreamlip_rows(path, counts=counts, max_record_chars=2000))
    assert [r.url for r in rows] == ["http://x/0.jpg", "http://x/3.jpg"]
    assert counts == Counter(rows=2, oversized_row=2)
    counts = Counter()
    rows = list(iter_dreamlip_rows(path, counts=counts))
    assert len(rows[1].long["LLA"]) == 100_000 and counts == Counter(rows=4)
