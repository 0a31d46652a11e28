"""{var}, {In[n]}, {Out[n]}, {Err[n]} fill a prompt from the notebook; what does not resolve stays as written."""

from __future__ import annotations

from sage_magic.notebook.interpolate import MAX_CHARS, interpolate, record_error


def test_variables_cells_and_outputs() -> None:
    ns = {"name": "Ada", "In": ["", "x = 1", "x + 1"], "Out": {2: 2}, "pi": 3.14159, "cfg": {"k": "v"}}
    assert interpolate("Hi {name}: {In[2]} gave {Out[2]}; {pi:.2f} {name!r} {cfg[k]}", ns) == \
        "Hi Ada: x + 1 gave 2; 3.14 'Ada' v"


def test_unresolved_fields_and_code_braces_survive() -> None:
    text = "def f(): return {'a': 1}  {missing} {Out[9]} {0} {name.nope} {{literal}}"
    assert interpolate(text, {"Out": {}, "name": "x"}) == \
        "def f(): return {'a': 1}  {missing} {Out[9]} {0} {name.nope} {literal}"


def test_errors_are_recorded_per_cell() -> None:
    ns: dict = {}
    try:
        1 / 0
    except ZeroDivisionError as error:
        record_error(ns, 7, error)
    record_error(ns, 8, None)
    assert "ZeroDivisionError: division by zero" in interpolate("Why {Err[7]}?", ns)
    assert list(ns["Err"]) == [7]


def test_a_dataframe_is_summarised_not_dumped() -> None:
    import pandas as pd

    frame = pd.DataFrame({"city": [f"c{i}" for i in range(10_000)], "temp": range(10_000)})
    text = interpolate("Describe {frame}", {"frame": frame})
    assert "DataFrame with 10000 rows and 2 columns (city:" in text and "temp: int64" in text
    assert "c4" in text and "c9999" not in text
    assert "Series 'temp' with 10000 values" in interpolate("{frame[temp]}", {"frame": frame})


def test_huge_values_are_cut() -> None:
    text = interpolate("{big}", {"big": "x" * (MAX_CHARS * 3)})
    assert len(text) < MAX_CHARS + 100 and "more characters cut" in text
