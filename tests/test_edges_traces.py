"""Edge cases of the trace readers found by fuzzing, and a property suite over generated files.

Every trace file either loads into requests with positive integer token counts (at most
``MAX_TOKENS``) and finite, sorted arrivals starting at 0, or is refused with a one-line
``ValueError`` (``TraceError``) naming the file; never another exception, never a hang.
"""

from __future__ import annotations

import json
import math
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traces import (
    LengthTable,
    LoadedTrace,
    ShareGPTLengths,
    TraceError,
    load_azure,
    load_sharegpt,
    load_trace,
    parse_fixed,
    parse_random,
)
from traces._checks import MAX_TOKENS
from traces.vllm_datasets import MIN_LEN

AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens"
BURST = "Timestamp,Model,Request tokens,Response tokens"
LENGTHS = "num_prefill_tokens,num_decode_tokens"
STAMP = "2023-11-16 18:15:46.6805900"
DEEP = "[" * 100_000 + "]" * 100_000


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return path


def _refused(path: Path) -> str:
    """Load ``path``, expect a one-line TraceError naming it, return the message."""
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message, message
    return message


def _moon(**fields: object) -> str:
    row: dict[str, object] = {"timestamp": 0, "input_length": 5, "output_length": 2}
    row.update(fields)
    return json.dumps(row)


# ---------------------------------------------------------------- tracebacks -> one line


@pytest.mark.parametrize(("line", "expected"), [
    (_moon(input_length=1e20), "mc.jsonl:1: input_length is out of range (0 to 1,000,000,000"),
    (_moon(input_length=10**23), "mc.jsonl:1: input_length is out of range"),
    (_moon(output_length=2**63), "mc.jsonl:1: output_length is out of range"),
    (_moon(timestamp=10**400), "mc.jsonl:1: timestamp is out of range (0 to 1e+13 ms): an integer"),
    ('{"timestamp": 1e400, "input_length": 5, "output_length": 2}',
     "mc.jsonl:1: timestamp is not a finite number: inf"),
    ('{"timestamp": NaN, "input_length": 5, "output_length": 2}',
     "mc.jsonl:1: timestamp is not a finite number: nan"),
    ('{"timestamp": 0, "input_length": Infinity, "output_length": 2}',
     "mc.jsonl:1: input_length is not an integer: inf"),
    (_moon(timestamp=-5), "mc.jsonl:1: timestamp is negative: -5"),
    (_moon(input_length=-1.0), "mc.jsonl:1: input_length is negative"),
    (_moon(input_length=2.5), "mc.jsonl:1: input_length is not an integer: 2.5"),
    ('{"timestamp": 0, "input_length": ' + "9" * 5000 + ', "output_length": 2}',
     "mc.jsonl:1: invalid JSON (a number with more than 4300 digits)"),
    ('{"timestamp": 0, "x": ' + DEEP + "}", "mc.jsonl:1: invalid JSON (nested too deeply)"),
    (DEEP, "mc.jsonl:1: invalid JSON (nested too deeply)"),
    ("[1, 2]", "mc.jsonl:1: expected a JSON object"),
    (_moon(hash_ids=[-1]), "mc.jsonl:1: hash_ids is not a list of integers in [0, 2^63)"),
    (_moon(hash_ids=[2**64]), "mc.jsonl:1: hash_ids is not a list of integers"),
])
def test_mooncake_bad_numbers_and_json_name_file_line_and_key(
        tmp_path: Path, line: str, expected: str) -> None:
    path = _write(tmp_path, "mc.jsonl", line + "\n")
    assert _refused(path).startswith(expected)


@pytest.mark.parametrize(("text", "expected"), [
    (f"{AZURE}\n{STAMP},9223372036854775808,44\n",
     "a.csv:2: ContextTokens is out of range (0 to 1,000,000,000 tokens): '9223372036854775808'"),
    (f"{AZURE}\n{STAMP},5,44\n{STAMP},99999999999999999999999,44\n",
     "a.csv:3: ContextTokens is out of range"),
    (f"{AZURE}\n{STAMP},5,{'1' * 200_000}\n", "a.csv:2: GeneratedTokens is out of range"),
    (f"{AZURE}\n{STAMP},inf,44\n", "a.csv:2: ContextTokens is not an integer: 'inf'"),
    (f"{AZURE}\n{STAMP},nan,44\n", "a.csv:2: ContextTokens is not an integer: 'nan'"),
    (f"{AZURE}\n{STAMP},1e400,44\n", "a.csv:2: ContextTokens is out of range"),
    (f"{AZURE}\n{STAMP},-3,44\n", "a.csv:2: ContextTokens is negative: '-3'"),
    (f"{AZURE}\n{STAMP},5,'{'x' * 200_000}'\n", "a.csv:2: GeneratedTokens is not an integer: "),
    (f"{AZURE}\n2261-01-01 00:00:00,5,44\n1700-01-01 00:00:00,5,44\n",
     "a.csv:2: TIMESTAMP '2261-01-01 00:00:00' is more than 1e+10 s after the earliest one"),
    (f"{AZURE}\n{STAMP},5,44\n9999-01-01 00:00:00,5,44\n",
     "a.csv:3: TIMESTAMP is out of range (years 1678 to 2261): '9999-01-01 00:00:00'"),
    (f"{AZURE}\n0084-01-01 00:00:00.000001,5,44\n",  # read alone, pandas would take it
     "a.csv:2: TIMESTAMP is out of range (years 1678 to 2261): '0084-01-01 00:00:00.000001'"),
    (f"{AZURE}\n{STAMP},5,44\n2023-13-01 00:00:00,5,44\n",
     "a.csv:3: TIMESTAMP is not a timestamp: '2023-13-01 00:00:00' (expected ISO 8601"),
    (f"{AZURE}\n1e400,5,44\n", "a.csv:2: TIMESTAMP is not a timestamp: '1e400'"),
    (f"{BURST}\n0,M,5,4\nnan,M,5,4\n", "a.csv:3: Timestamp is not a finite number: 'nan'"),
    (f"{BURST}\n-inf,M,5,4\n", "a.csv:2: Timestamp is not a finite number: '-inf'"),
    (f"{BURST}\n-5,M,5,4\n", "a.csv:2: Timestamp is negative: '-5'"),
    (f"{BURST}\n1e300,M,5,4\n", "a.csv:2: Timestamp is out of range (0 to 1e+10 s): '1e300'"),
    (f"{BURST}\n1{'0' * 400},M,5,4\n", "a.csv:2: Timestamp is out of range"),
    (f"{BURST}\n0,M,5,{2**64}\n", "a.csv:2: Response tokens is out of range"),
    (f"{LENGTHS}\n18446744073709551616,5\n", "a.csv:2: num_prefill_tokens is out of range"),
    (f"{LENGTHS}\n5,4.5\n", "a.csv:2: num_decode_tokens is not an integer: '4.5'"),
    (f"{LENGTHS}\n{LENGTHS}\n", "a.csv:2: num_prefill_tokens is not an integer"),
    (f"{LENGTHS},num_decode_tokens\n5,5,5\n", "a.csv:1: column num_decode_tokens appears 2 times"),
    (f"{LENGTHS}\n5,5,5\n", "a.csv:2: expected 2 fields, saw 3"),
    (f"{LENGTHS}\n5,5\n\n\n5,5,5\n", "a.csv:5: expected 2 fields, saw 3"),
    (f'\n{LENGTHS}\n5,5\n5,"5\n', "a.csv:4: a quoted field is never closed"),
])
def test_csv_numbers_checked_with_file_line_column_and_bound(
        tmp_path: Path, text: str, expected: str) -> None:
    # (the 2^63 rows were once cast to negative int64 and skipped as "zero-token rows")
    assert _refused(_write(tmp_path, "a.csv", text)).startswith(expected)


def test_csv_field_over_the_csv_modules_limit_is_read(tmp_path: Path) -> None:
    """A 200,000-character cell in a column the loader ignores is fine (csv's limit is 131,072)."""
    path = _write(tmp_path, "b.csv", f"{BURST}\n0,{'m' * 200_000},5,4\n2,M,6,3\n")
    trace = load_trace(path)
    assert isinstance(trace, LoadedTrace)
    assert [(r.arrival_s, r.prompt_tokens) for r in trace.requests] == [(0.0, 5), (2.0, 6)]


def test_sharegpt_huge_numbers_deep_nesting_and_lone_surrogates(tmp_path: Path) -> None:
    turns = '{"conversations": [{"value": "a question here"}, {"value": "an answer, here"}]}'
    for text, expected in [
        (f"[{turns}, {'9' * 5000}]", "s.json: invalid JSON (a number with more than 4300 digits)"),
        (f"[{turns}, {DEEP}]", "s.json: invalid JSON (nested too deeply)"),
        (f"[{turns}, 1e400]", "s.json: entry 1: expected an object with 'conversations'"),
        (f"[{turns},", "s.json:1: invalid JSON (Expecting value at column"),
    ]:
        assert _refused(_write(tmp_path, "s.json", text)).startswith(expected)
    # JSON's \ud800 escape decodes to a lone surrogate: counted, not a UnicodeEncodeError
    lone = '[{"conversations": [{"value": "\\ud800\\ud800\\ud800\\ud800\\ud800"}, ' \
           '{"value": "an answer here"}]}]'
    lengths = load_sharegpt(_write(tmp_path, "lone.json", lone))
    assert lengths.prompt_tokens.tolist() == [4] and lengths.valid.tolist() == [True]


# ---------------------------------------------------------------- valid variants accepted


@pytest.mark.parametrize("text", [
    f'"TIMESTAMP","ContextTokens","GeneratedTokens"\n"{STAMP}","5","44"\n"{STAMP}","6","4"\n',
    f'"TIMESTAMP","ContextTokens","GeneratedTokens"\n{STAMP},5,44\n{STAMP},6,4\n',
    f"\ufeff{AZURE}\r\n{STAMP},5,44\r\n{STAMP},6,4\r\n\r\n\r\n",
    f"\n \n{AZURE}\n\n{STAMP},5,44\n  \n{STAMP},6,4\n\n \t\n",
    f"\ufeff\"TIMESTAMP\",\"ContextTokens\",\"GeneratedTokens\"\r{STAMP},5,44\r{STAMP},6,4\r",
    f" TIMESTAMP , ContextTokens , GeneratedTokens \n {STAMP} , 5 , 44 \n{STAMP},6,4",
])
def test_azure_quoted_bom_crlf_and_blank_line_variants_load(tmp_path: Path, text: str) -> None:
    trace = load_trace(_write(tmp_path, "azure.csv", text))
    assert isinstance(trace, LoadedTrace)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [(5, 44), (6, 4)]


def test_other_formats_accept_quotes_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    burst = load_trace(_write(tmp_path, "b.csv", '\ufeff"Timestamp","Model","Request tokens",'
                                                 '"Response tokens"\r\n\r\n"0","M","5","4"\r\n\r\n'))
    assert isinstance(burst, LoadedTrace) and burst.requests[0].prompt_tokens == 5
    table = load_trace(_write(tmp_path, "l.csv", '\n"num_prefill_tokens","num_decode_tokens"\n'
                                                 '7,3\n\n'))
    assert isinstance(table, LengthTable) and table.prompt_tokens.tolist() == [7]
    rows = "\ufeff\r\n" + _moon() + "\r\n\r\n" + _moon(timestamp=500) + "\r\n \r\n"
    moon = load_trace(_write(tmp_path, "m.jsonl", rows))
    assert isinstance(moon, LoadedTrace) and [r.arrival_s for r in moon.requests] == [0.0, 0.5]
    # a .json of Mooncake rows whose first row is longer than 64 KiB is still Mooncake
    ids = ",".join(["123456"] * 20_000)
    long_row = load_trace(_write(tmp_path, "long.json", _moon()[:-1] + f', "hash_ids": [{ids}]}}\n'))
    assert isinstance(long_row, LoadedTrace) and long_row.requests[0].prompt_tokens == 5
    # bounds are inclusive: MAX_TOKENS tokens and 10^10 s are accepted
    edge = load_trace(_write(tmp_path, "e.csv", f"{BURST}\n0,M,{MAX_TOKENS},1\n1e10,M,1,1\n"))
    assert isinstance(edge, LoadedTrace) and edge.requests[0].prompt_tokens == MAX_TOKENS


def test_paths_that_are_not_readable_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="trace path is not a file"):
        load_trace(tmp_path)
    for name in ("empty.csv", "empty.jsonl", "empty.json"):
        assert _refused(_write(tmp_path, name, "")).startswith(f"{name}: empty file")
        assert _refused(_write(tmp_path, name, "\n \r\n")).startswith(f"{name}: empty file")
    with pytest.raises(TraceError, match=r"^blank\.csv: empty file \(no header\)$"):
        load_azure(_write(tmp_path, "blank.csv", "\n  \n"))


def test_unreadable_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "locked.jsonl", _moon() + "\n")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)  # the tests run as root: chmod would not stop them
    assert _refused(path) == "locked.jsonl: cannot read (Permission denied)"


# ---------------------------------------------------------------- dataset specs


@pytest.mark.parametrize(("spec", "fragment"), [
    ("random:" + "9" * 30 + ":5", "random input length must be at most 1,000,000,000 tokens"),
    ("random:5:99999999999999999999:0.5", "random output length must be at most"),
    (f"random:{MAX_TOKENS}:5:0.5", "can draw 1,500,000,000 tokens, over the 1,000,000,000 limit"),
    ("random:" + "9" * 5000 + ":5", "random workload needs integer lengths"),
    ("random:1e20:5", "random workload needs integer lengths"),
    ("random:5:5:nan", "random range ratio must be in [0, 1)"),
    ("random:5:5:1e400", "random range ratio must be in [0, 1)"),
])
def test_random_spec_bounds(spec: str, fragment: str) -> None:
    with pytest.raises(TraceError) as info:
        parse_random(spec)
    assert fragment in str(info.value) and len(str(info.value)) < 200


def test_dataset_spec_bounds_are_inclusive_and_fixed_is_bounded() -> None:
    assert parse_random(f"random:{MAX_TOKENS}:{MAX_TOKENS}").bounds()[1] == MAX_TOKENS
    assert parse_fixed(f"fixed:{MAX_TOKENS}:1").prompt == MAX_TOKENS
    with pytest.raises(TraceError, match="fixed prompt length must be at most 1,000,000,000"):
        parse_fixed(f"fixed:{MAX_TOKENS + 1}:1")
    with pytest.raises(TraceError, match="fixed output length must be at most"):
        parse_fixed("fixed:5:" + "9" * 40)


# ---------------------------------------------------------------- property suite

# Each generated file is clean (sane values: it must load) or dirty (each value bad with odds
# 1 in 3), then maybe cut short or spliced with random text; one in ten is random bytes.

BAD_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, 2**63, 2**64, MAX_TOKENS + 1, 0, -1, 1e20, 1e400, -0.0, 0.5, 1e13]),
    st.floats(allow_nan=True, allow_infinity=True),
)
BAD_CELLS = st.one_of(
    BAD_NUMBERS.map(json.dumps),
    st.sampled_from(["", " ", "abc", "nan", "inf", "-inf", "1e400", "9" * 30, "0x10", "١٢",
                     "5.5", '"8"', "x" * 140_000, "9" * 5000, "\x00", "1,2", "2023-13-01",
                     "0084-01-01 00:00:00", "9999-12-31", "-2023-01-01"]),
    st.text(max_size=6),
)


def _maybe_bad(draw: st.DrawFn, dirty: bool, good: st.SearchStrategy[str]) -> str:
    return draw(BAD_CELLS if dirty and draw(st.integers(0, 2)) == 0 else good)


COUNTS = st.integers(0, 3000).map(str) | st.sampled_from(["5.0", " 7 ", "1e3", str(MAX_TOKENS)])


def _csv_line(cells: list[str], quote: bool) -> str:
    if quote:
        return ",".join('"' + c.replace('"', '""') + '"' for c in cells)
    return ",".join(cells)


@st.composite
def csv_files(draw: st.DrawFn, dirty: bool) -> tuple[str, str]:
    header = draw(st.sampled_from([AZURE, BURST, LENGTHS]))
    columns = header.split(",")
    seconds = sorted(draw(st.lists(st.floats(0, 1e6), min_size=1, max_size=6)))
    lines = [_csv_line(columns, quote := draw(st.booleans()))]
    for t in seconds:
        if header == AZURE:  # absolute, any order
            days = st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1))
            first = draw(days.map(lambda d: d.isoformat(sep=" ")) | st.just(STAMP))
        else:
            first = repr(t) if header == BURST else draw(COUNTS)
        cells = [_maybe_bad(draw, dirty, st.just(first))]
        cells += [_maybe_bad(draw, dirty, COUNTS if c != "Model" else st.text(max_size=5))
                  for c in columns[1:]]
        if dirty and draw(st.integers(0, 9)) == 0:
            cells = cells[: draw(st.integers(0, len(cells) + 1))] + ["1"]  # too few or too many
        lines.append(_csv_line(cells, quote))
        if draw(st.integers(0, 4)) == 0:
            lines.append(draw(st.sampled_from(["", " ", "\t"])))
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return ".csv", draw(st.sampled_from(["", "\ufeff"])) + ending.join(lines) + ending


@st.composite
def mooncake_files(draw: st.DrawFn, dirty: bool) -> tuple[str, str]:
    rows = []
    for stamp in sorted(draw(st.lists(st.integers(0, 10**9) | st.floats(0, 1e9), min_size=1, max_size=6))):
        good = {"timestamp": stamp, "input_length": draw(st.integers(0, 10**5)),
                "output_length": draw(st.integers(0, 3000)),
                "hash_ids": draw(st.lists(st.integers(0, 2**63 - 1), max_size=3))}
        row = {k: draw(BAD_NUMBERS | JSON_VALUES) if dirty and draw(st.integers(0, 3)) == 0
               else v for k, v in good.items() if not dirty or draw(st.integers(0, 9))}
        if draw(st.integers(0, 3)) == 0:
            row["extra"] = draw(JSON_VALUES)
        rows.append(json.dumps(row))
    if dirty and draw(st.integers(0, 3)) == 0:
        rows.append(draw(st.sampled_from([DEEP, "{not json", "[1]", '{"timestamp": 1' + "0" * 400,
                                          '{"timestamp": 0, "input_length": ' + "9" * 5000])))
    return draw(st.sampled_from([".jsonl", ".json"])), "\r\n".join(rows) + "\n"


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), BAD_NUMBERS, st.text(max_size=5)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=6,
)


@st.composite
def sharegpt_files(draw: st.DrawFn, dirty: bool) -> tuple[str, str]:
    texts = st.text(min_size=12, max_size=60) | st.sampled_from(["a long enough question", "\ud800" * 9])
    turn = st.fixed_dictionaries({"from": st.just("human"), "value": texts})
    entries = []
    for _ in range(draw(st.integers(1, 5))):
        turns = draw(st.lists(turn | JSON_VALUES if dirty else turn, max_size=3))
        entries.append({"id": "x", "conversations": turns} if not dirty or draw(st.booleans())
                       else draw(JSON_VALUES))
    text = json.dumps(entries)
    if dirty and draw(st.integers(0, 3)) == 0:
        text = text[:-1] + ", " + draw(st.sampled_from([DEEP, "9" * 5000, "NaN", "1e400"])) + "]"
    return ".json", text


@st.composite
def trace_files(draw: st.DrawFn) -> tuple[str, bytes]:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([".csv", ".jsonl", ".json"])), draw(st.binary(max_size=64))
    dirty = draw(st.booleans())
    make = draw(st.sampled_from([csv_files, mooncake_files, sharegpt_files]))
    suffix, text = draw(make(dirty))
    kind = draw(st.integers(0, 5)) if dirty else 5
    if kind == 0 and text:  # cut short
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif kind == 1:  # random characters spliced in
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=8)) + text[at:]
    return suffix, text.encode("utf-8", "surrogatepass")


def _check_loaded(result: object) -> None:
    if isinstance(result, LoadedTrace):
        reqs = result.requests
        assert reqs and [r.req_id for r in reqs] == list(range(len(reqs)))
        arrivals = [r.arrival_s for r in reqs]
        assert arrivals[0] == 0.0 and all(math.isfinite(t) for t in arrivals)
        assert arrivals == sorted(arrivals)
        for r in reqs:
            assert type(r.prompt_tokens) is int and type(r.output_tokens) is int
            assert 0 < r.prompt_tokens <= MAX_TOKENS and 0 < r.output_tokens <= MAX_TOKENS
    elif isinstance(result, LengthTable):
        for a in (result.prompt_tokens, result.output_tokens):
            assert len(a) and a.dtype == np.int64 and a.min() > 0 and a.max() <= MAX_TOKENS
    else:
        assert isinstance(result, ShareGPTLengths)
        valid = result.valid
        assert valid.any() and result.prompt_tokens[valid].min() >= MIN_LEN
        assert result.output_tokens[valid].min() >= MIN_LEN


def _load_or_refuse(suffix: str, data: bytes) -> object:
    """``load_trace``'s result, or the TraceError it raised (checked: one line naming the file).
    Any other exception propagates and fails the test with its traceback."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"trace{suffix}"
        path.write_bytes(data)
        try:
            result = load_trace(path)
        except ValueError as exc:
            message = str(exc)
            assert isinstance(exc, TraceError) and message and "\n" not in message
            assert path.name in message
            return exc
        _check_loaded(result)
        return result


@settings(derandomize=True, database=None, deadline=None, max_examples=60,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(trace_files())
def test_generated_trace_files_load_or_refuse_in_one_line(file: tuple[str, bytes]) -> None:
    _load_or_refuse(*file)


@settings(derandomize=True, database=None, deadline=None, max_examples=30,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([csv_files, mooncake_files, sharegpt_files]).flatmap(lambda f: f(False)))
def test_clean_generated_files_are_never_refused_but_for_having_no_requests(
        file: tuple[str, str]) -> None:
    """Valid input is not rejected: a clean file fails only when it has nothing to simulate."""
    result = _load_or_refuse(file[0], file[1].encode("utf-8", "surrogatepass"))
    if isinstance(result, TraceError):
        assert any(why in str(result) for why in (
            "no data rows", "no requests left", "no rows left", "passes vLLM's ShareGPT filters",
            "empty file")), result
