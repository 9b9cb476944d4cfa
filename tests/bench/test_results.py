"""The benchmarks' CSVs: rows appended, a column added later without losing the earlier rows, and a file whose
lines do not fit its header refused before anything is written."""
import csv

import pytest

from megatron_dapo.bench.results import append_rows


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_are_appended_and_a_new_column_keeps_the_earlier_rows(tmp_path):
    path = append_rows(tmp_path, "push", [{"tp": 1, "gb_per_s": 2.5}])
    append_rows(tmp_path, "push", [{"tp": 2, "gb_per_s": 1.5}])
    append_rows(tmp_path, "push", [{"tp": 1, "gb_per_s": 2.0, "ops": "fused kernels"}])
    assert _rows(path) == [{"tp": "1", "gb_per_s": "2.5", "ops": ""}, {"tp": "2", "gb_per_s": "1.5", "ops": ""},
                           {"tp": "1", "gb_per_s": "2.0", "ops": "fused kernels"}]
    assert not list(tmp_path.glob("*.partial"))


def test_a_file_whose_lines_do_not_fit_its_header_is_refused_untouched(tmp_path):
    path = tmp_path / "push.csv"
    text = "tp,gb_per_s\n1,2.5\n2,1.5,extra\n"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"push.csv: line\(s\) \[3\] hold more cells than its header"):
        append_rows(tmp_path, "push", [{"tp": 4, "gb_per_s": 1.0, "ops": "x"}])
    assert path.read_text() == text


def test_a_last_line_without_its_newline_is_not_joined_to_the_next_row(tmp_path):
    path = tmp_path / "push.csv"
    path.write_text("tp,gb_per_s\n1,2.5")  # edited by hand, the newline lost
    append_rows(tmp_path, "push", [{"tp": 2, "gb_per_s": 1.5}])
    assert _rows(path) == [{"tp": "1", "gb_per_s": "2.5"}, {"tp": "2", "gb_per_s": "1.5"}]
