"""The Criteo reader's language: the C fast path and the reference parser agree on every
mutant, and every line is either parsed exactly or rejected at its own line number."""
import contextlib
import gzip

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data import criteo
from data.criteo import MISSING_ID, CriteoFormatError, parse_line, read_criteo
from data.synth import synth
from tests.test_data import GOOD

pytestmark = pytest.mark.skipif(criteo._criteo_parse is None, reason="C extension not built")
INT64_MAX = (1 << 63) - 1


def spec(line: bytes, labelled: bool = True):
    """The documented language, written independently of the library: None if the line
    is malformed, else (label, dense, ids)."""
    text = line[:-1] if line.endswith(b"\r") else line
    try:
        text = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    fields = text.split("\t")
    if len(fields) != 40 - (not labelled):
        return None
    label = 0.0
    if labelled:
        if fields[0] not in ("0", "1"):
            return None
        label, fields = float(fields[0]), fields[1:]
    dense = []
    for f in fields[:13]:
        body = f[1:] if f[:1] in ("+", "-") else f
        if f and not (body and all(c in "0123456789" for c in body)):
            return None
        v = int(f) if f else 0
        if not -INT64_MAX - 1 <= v <= INT64_MAX:
            return None
        dense.append(np.float32(v))
    ids = []
    for f in fields[13:]:
        if f and not (len(f) == 8 and all(c in "0123456789abcdefABCDEF" for c in f)):
            return None
        ids.append(int(f, 16) if f else MISSING_ID)
    return label, dense, ids


@contextlib.contextmanager
def reference_only():
    saved, criteo._criteo_parse = criteo._criteo_parse, None
    try:
        yield
    finally:
        criteo._criteo_parse = saved


def read(path, **kw):
    """(labels, dense, sparse, skipped) or the error message."""
    try:
        chunks = list(read_criteo(path, **kw))
    except CriteoFormatError as e:
        return str(e)
    return tuple(np.concatenate([getattr(c, k) for c in chunks]) for k in ("labels", "dense", "sparse")) + (
        sum(c.skipped for c in chunks),)


def same(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def c_line(line: bytes, labelled: bool = True):
    """The C parser alone on one line: None if rejected, else (label, dense, ids)."""
    lab, dense, ids = np.zeros(1, np.float32), np.zeros(13, np.float32), np.zeros(26, np.int64)
    n, bad = criteo._criteo_parse.parse(line + b"\n", labelled, lab, dense, ids)
    assert (n, bad) in ((1, -1), (0, 0))
    return (float(lab[0]), dense.tolist(), ids.tolist()) if n else None


def reference(line: bytes, labelled: bool = True):
    try:
        return parse_line(line, labelled)
    except criteo.BadLine:
        return None


def agree(line: bytes, labelled: bool = True) -> None:
    want, c, ref = spec(line, labelled), c_line(line, labelled), reference(line, labelled)
    assert (want is None) == (c is None) == (ref is None), (line, want, c, ref)
    if want is not None:
        for got in (c, ref):
            assert got[0] == want[0] and np.array_equal(np.float32(got[1]), want[1]) and got[2] == want[2], line


SPECIAL = [b"", b"0", b"-0", b"+0", b"+", b"-", b"--1", b"1e39", b"1e308", b"1E5", b"1.0", b"1.", b"nan", b"NaN",
           b"NA", b"inf", b"-inf", b" 1", b"1 ", b"0x10", b"\xef\xbc\x91", b"\xff", b"\r", b"1\r", b"\xef\xbb\xbf1",
           b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809",
           b"18446744073709551616", b"340282366920938463463374607431768211456", b"0000000000000000000000042",
           b"16777217", b"68fd1e64", b"68FD1E64", b"68fd1e6", b"68fd1e641", b"68fd1e6g", b"\t", b"\x00"]


def test_every_byte_value_at_every_position():
    for pos in range(len(GOOD)):
        for byte in range(256):
            line = bytearray(GOOD.encode())
            line[pos] = byte
            if byte != 10:
                agree(bytes(line))


@pytest.mark.parametrize("value", SPECIAL)
def test_special_values_in_every_kind_of_column(value):
    fields = GOOD.encode().split(b"\t")
    for col in (0, 1, 3, 14, 35, 39):  # label, I1, I3, C1, C22 (empty), C26
        line = fields[:col] + [value] + fields[col + 1 :]
        agree(b"\t".join(line))
        agree(b"\t".join(line[1:]), labelled=False)


mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 400), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 400), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 400), st.just(0)),
    st.tuples(st.just("field"), st.integers(0, 39), st.sampled_from(SPECIAL)),
)


def mutate(line: bytes, muts) -> bytes:
    for kind, at, x in muts:
        if kind == "field":
            fields = line.split(b"\t")
            fields[at % len(fields)] = x
            line = b"\t".join(fields)
        else:
            at %= len(line) + 1
            if kind == "set" and at < len(line):
                line = line[:at] + bytes([x]) + line[at + 1 :]
            elif kind == "insert":
                line = line[:at] + bytes([x]) + line[at:]
            elif kind == "delete":
                line = line[:at] + line[at + 1 :]
    return line


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.lists(mutation, min_size=1, max_size=3), min_size=1, max_size=6))
def test_fuzzed_files_fast_equals_reference_and_spec(tmp_path, lines):
    good = GOOD.encode()
    mutants = [mutate(good, m) for m in lines]
    # a mutant holding '\n' becomes several lines, each judged on its own
    body = b"\n".join([good] + [x for m in mutants for x in (m, good)]) + b"\n"
    path = tmp_path / "f.tsv"
    path.write_bytes(body)
    for skip in (False, True):
        fast = read(path, skip_bad_lines=skip, chunk_rows=2)  # blocks of a few lines: several C calls
        with reference_only():
            ref = read(path, skip_bad_lines=skip, chunk_rows=2)
        assert same(fast, ref), (fast, ref)
    file_lines = body.split(b"\n")[:-1]
    verdicts = [spec(x) for x in file_lines]
    first_bad = next((i for i, v in enumerate(verdicts) if v is None), None)
    strict = read(path)
    if first_bad is None:
        assert strict[1].tolist() == [v[1] for v in verdicts] and strict[2].tolist() == [v[2] for v in verdicts]
    else:
        assert isinstance(strict, str) and f"{path}:{first_bad + 1}: " in strict, (strict, first_bad)
    kept = [v for v in verdicts if v is not None]
    labels, dense, sparse, skipped = read(path, skip_bad_lines=True)
    assert skipped == len(verdicts) - len(kept) and sparse.tolist() == [v[2] for v in kept]


def test_fast_path_equals_reference_on_generated_data(tmp_path):
    synth(3000, tmp_path / "d.tsv", seed=2, scale=0.001)
    with open(tmp_path / "d.tsv", "a") as f:
        f.write(GOOD.upper() + "\n" + "\t".join(["0"] + [""] * 39) + "\n")  # upper-case hex, all missing
    fast = read(tmp_path / "d.tsv")
    with reference_only():
        ref = read(tmp_path / "d.tsv")
    assert same(fast, ref) and fast[2][-1].tolist() == [MISSING_ID] * 26 and fast[2][-2, 0] == 0x68FD1E64


@pytest.mark.parametrize("value", [b"1e39", b"1e308", b"inf", b"nan", b"NA", b"9223372036854775808"])
def test_overflowing_dense_value_is_a_format_error(tmp_path, value):
    bad = GOOD.encode().replace(b"\t3\t", b"\t" + value + b"\t", 1)
    path = tmp_path / "x.tsv"
    path.write_bytes(b"\n".join([GOOD.encode(), bad, GOOD.encode()]) + b"\n")
    with pytest.raises(CriteoFormatError, match=r"x\.tsv:2: column I3"):
        list(read_criteo(path))
    labels, dense, _, skipped = read(path, skip_bad_lines=True)
    assert skipped == 1 and len(labels) == 2 and np.isfinite(dense).all()


def test_stray_carriage_return_is_its_own_bad_line_and_crlf_is_fine(tmp_path):
    lines = [GOOD.encode()] * 5
    lines[1] = lines[1].replace(b"\t3\t", b"\t3\r\t", 1)
    (tmp_path / "x.tsv").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(CriteoFormatError, match=r"x\.tsv:2: column I3"):
        list(read_criteo(tmp_path / "x.tsv"))
    lines[1] = GOOD.encode()
    lines[3] = GOOD.encode().replace(b"68fd1e64", b"68fd1e6g")
    (tmp_path / "x.tsv").write_bytes(b"\r\n".join(lines) + b"\r\n")  # CRLF: line numbers as with LF
    with pytest.raises(CriteoFormatError, match=r"x\.tsv:4: column C1"):
        list(read_criteo(tmp_path / "x.tsv"))
    assert read(tmp_path / "x.tsv", skip_bad_lines=True)[3] == 1


def test_non_ascii_bytes_are_a_skippable_format_error(tmp_path):
    bad = GOOD.encode().replace(b"68fd1e64", "68fd1é64".encode()[:8])
    (tmp_path / "x.tsv").write_bytes(b"\n".join([GOOD.encode(), bad, b"\xff\xfe", GOOD.encode()]) + b"\n")
    with pytest.raises(CriteoFormatError, match=r"x\.tsv:2: column C1"):
        list(read_criteo(tmp_path / "x.tsv"))
    assert read(tmp_path / "x.tsv", skip_bad_lines=True)[3] == 2


def test_corrupt_deflate_body_names_the_file(tmp_path):
    blob = bytearray(gzip.compress(("\n".join([GOOD] * 2000) + "\n").encode()))
    for i in range(40, 60):
        blob[i] ^= 0xFF
    (tmp_path / "c.tsv.gz").write_bytes(bytes(blob))
    with pytest.raises(CriteoFormatError, match=r"c\.tsv\.gz: truncated or corrupt gzip"):
        list(read_criteo(tmp_path / "c.tsv.gz"))
