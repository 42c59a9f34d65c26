"""URL-list readers: every real format, and bad rows counted by reason instead of raised."""

from __future__ import annotations

import csv
import gzip
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.download.url_lists import UrlRecord, dedupe_urls, read_url_list, shard_records

DREAMLIP_HEADER = [
    "Image Path", "raw_caption", "shortIB_captions", "longIB_captions",
    "shortSV_captions", "longSV_captions", "shortLLA_captions", "longLLA_captions",
]  # fmt: skip


def read(path, fmt, source="src"):
    counts: Counter = Counter()
    return list(read_url_list(str(path), fmt, source, counts=counts)), counts


def test_cc3m_tsv_caption_then_url_with_bad_rows(tmp_path):
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text(
        "a dog on a beach\thttp://example.com/dog.jpg\n"
        "\n"
        "only a caption, no tab\n"
        "two fields but\tno url here\n"
        "  \t  \n"
        "a cat\thttps://example.com/cat.png\r\n"
        "a stray \r carriage return\thttp://example.com/cr.jpg\n"
    )
    records, counts = read(path, "cc3m", "cc3m")
    assert records == [
        UrlRecord("http://example.com/dog.jpg", "a dog on a beach", "cc3m"),
        UrlRecord("https://example.com/cat.png", "a cat", "cc3m"),
        UrlRecord("http://example.com/cr.jpg", "a stray \r carriage return", "cc3m"),
    ]
    assert counts == Counter(empty_line=2, missing_column=1, no_url=1)


def test_cc12m_tsv_url_then_caption_gzipped(tmp_path):
    path = tmp_path / "cc12m.tsv.gz"
    with gzip.open(path, "wt") as f:
        f.write("url\tcaption\n")  # some re-releases carry a header
        f.write("https://example.com/a.jpg\t<PERSON> at the market\n")
        f.write("http://example.com/b.jpg\t\n")  # no caption: the URL still counts
        f.write("ftp://example.com/c.jpg\tftp, left for the fetcher to refuse\n")
    records, counts = read(path, "cc12m", "cc12m")
    assert records == [
        UrlRecord("https://example.com/a.jpg", "<PERSON> at the market", "cc12m"),
        UrlRecord("http://example.com/b.jpg", None, "cc12m"),
        UrlRecord("ftp://example.com/c.jpg", "ftp, left for the fetcher to refuse", "cc12m"),
    ]
    assert counts == Counter(header=1)


def test_yfcc15m_csv_with_title_and_description(tmp_path):
    path = tmp_path / "yfcc15m.csv"
    path.write_text(
        "photoid,downloadurl,title,description\n"
        "1,http://farm1.staticflickr.com/1.jpg,Sunset,Over the bay\n"
        "2,http://farm1.staticflickr.com/2.jpg,,\n"
        "3,,No url,\n"
        "4\n"
        "\n"
    )
    records, counts = read(path, "yfcc15m", "yfcc")
    assert records == [
        UrlRecord("http://farm1.staticflickr.com/1.jpg", "Sunset. Over the bay", "yfcc"),
        UrlRecord("http://farm1.staticflickr.com/2.jpg", None, "yfcc"),
    ]
    assert counts == Counter(no_url=1, missing_column=1, empty_line=1)


def test_yfcc15m_parquet_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.download.url_lists._PARQUET_BATCH_ROWS", 2)
    path = tmp_path / "yfcc15m.parquet"
    table = pa.table(
        {
            "key": [1, 2, 3, 4, 5],
            "url": ["http://a/1.jpg", None, "http://a/3.jpg", "not a url", "http://a/5.jpg"],
            "caption": ["one", "two", None, "four", "five"],
        }
    )
    pq.write_table(table, path)
    records, counts = read(path, "yfcc15m", "yfcc")
    assert records == [
        UrlRecord("http://a/1.jpg", "one", "yfcc"),
        UrlRecord("http://a/3.jpg", None, "yfcc"),
        UrlRecord("http://a/5.jpg", "five", "yfcc"),
    ]
    assert counts == Counter(no_url=2)


def test_yfcc15m_without_a_url_column_is_a_clear_error(tmp_path):
    path = tmp_path / "yfcc15m.csv"
    path.write_text("photoid,title\n1,x\n")
    with pytest.raises(ValueError, match="no URL column"):
        read(path, "yfcc15m")


def test_dreamlip_csv_with_multiline_quoted_fields_and_bad_rows(tmp_path):
    path = tmp_path / "cc3m_3long_3short_1raw_captions_url.csv"
    long_caption = "The image shows a dog.\nIt runs on sand, with \"waves\" behind it.\n\nA ball lies nearby."
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DREAMLIP_HEADER)
        writer.writerow(["http://example.com/dog.jpg", "dog on beach", "s1", long_caption, "s2", "l2", "s3", "l3"])
        writer.writerow([])
        writer.writerow(["http://example.com/short-row.jpg", "too few columns"])
        writer.writerow(["", "no url", "s", "l", "s", "l", "s", "l"])
        writer.writerow(["http://example.com/cat.jpg", "cat", "s1", "l1", "s2", "l2", "s3", "l3"])
        # A stray quote that never closes: the rest of the file is one field, then EOF.
        f.write('http://example.com/broken.jpg,"unterminated caption,s,l,s,l,s,l\n')
        f.write("http://example.com/lost.jpg,lost,s,l,s,l,s,l\n")
    records, counts = read(path, "dreamlip", "dreamlip")
    assert records == [
        UrlRecord("http://example.com/dog.jpg", "dog on beach", "dreamlip"),
        UrlRecord("http://example.com/cat.jpg", "cat", "dreamlip"),
    ]
    assert counts == Counter(empty_line=1, missing_column=2, no_url=1)


def test_dreamlip_csv_stray_quote_is_bounded_and_resynchronises(tmp_path):
    limit = csv.field_size_limit()
    csv.field_size_limit(200)
    try:
        path = tmp_path / "dreamlip.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(DREAMLIP_HEADER)
            f.write('http://example.com/broken.jpg,"a quote that never closes,s,l,s,l,s,l\n')
            for i in range(20):
                f.write(f"http://example.com/{i}.jpg,caption {i},s,l,s,l,s,l\n")
        records, counts = read(path, "dreamlip")
        assert csv.field_size_limit() == 200  # the reader left the process-wide limit alone
    finally:
        csv.field_size_limit(limit)
    assert counts["malformed_row"] == 1
    assert records[-1].url == "http://example.com/19.jpg"  # later rows survive the broken one


def test_dedupe_counts_duplicates_and_keeps_the_first():
    records = [UrlRecord(u, c, "s") for u, c in [("http://a/1", "x"), ("http://a/2", "y"), ("http://a/1", "z"), ("http://a/1", None)]]
    counts: Counter = Counter()
    assert list(dedupe_urls(records, counts)) == records[:2]
    assert counts == Counter(duplicate_url=2)


def test_shard_records_splits_in_order():
    records = [UrlRecord(f"http://a/{i}", None, "s") for i in range(7)]
    shards = list(shard_records(iter(records), 3))
    assert [len(s) for s in shards] == [3, 3, 1]
    assert [r for s in shards for r in s] == records
    with pytest.raises(ValueError):
        list(shard_records(records, 0))


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown URL list format"):
        read(tmp_path / "x.tsv", "laion")


def test_url_with_a_raw_space_is_a_url_in_every_format(tmp_path):
    """Issue 13 item 7: kept as listed (the fetcher quotes it, the caption join matches it), never `no_url`."""
    spaced = "http://example.com/a photo of 2 dogs.jpg"
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text(f"two dogs\t{spaced}\nhttp://example.com/x a caption that starts like a URL\thttp://example.com/x.jpg\n")
    records, counts = read(tsv, "cc3m")
    assert [r.url for r in records] == [spaced, "http://example.com/x.jpg"]
    assert records[1].caption == "http://example.com/x a caption that starts like a URL"
    assert counts == Counter()
    yfcc = tmp_path / "yfcc.csv"
    yfcc.write_text(f"url,caption\n{spaced},dogs\nnot a url,x\n")
    records, counts = read(yfcc, "yfcc15m")
    assert [r.url for r in records] == [spaced] and counts == Counter(no_url=1)
    dreamlip = tmp_path / "dreamlip.csv"
    with open(dreamlip, "w", newline="") as f:
        csv.writer(f).writerows([DREAMLIP_HEADER, [f" {spaced} ", "dogs", "s", "l", "s", "l", "s", "l"]])
    records, counts = read(dreamlip, "dreamlip")
    assert [r.url for r in records] == [spaced] and counts == Counter()


def test_reading_never_changes_the_process_wide_csv_field_limit(tmp_path):
    """Issue 13 item 6: csv.field_size_limit is global; no reader of ours may raise it for everyone."""
    import subprocess
    import sys

    path = tmp_path / "dreamlip.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([DREAMLIP_HEADER, ["http://example.com/a.jpg", "a", "s", "l", "s", "l", "s", "l"]])
    code = (
        "import csv, collections\n"
        "before = csv.field_size_limit()\n"
        "import tasks.download.url_lists as u, tasks.captions.dreamlip as d\n"
        f"list(u.read_url_list({str(path)!r}, 'dreamlip', 's', counts=collections.Counter()))\n"
        f"list(d.iter_dreamlip_rows({str(path)!r}, counts=collections.Counter()))\n"
        "assert csv.field_size_limit() == before, (before, csv.field_size_limit())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[3]))
    assert done.returncode == 0, done.stderr
