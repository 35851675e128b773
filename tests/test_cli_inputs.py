"""Issue 21, the CLI's part: every input an operator (or a file, or a client's model name) can hand
the CLI ends in one clear line, never a traceback (docs/cli-inputs.md).

Most checks run the CLI in-process (infermesh_cli.main.main with argv) for speed; a few run it as a
process, with argv bytes that are not UTF-8.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import stat
import subprocess
import sys
import time
import tracemalloc
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infermesh_cli import inputs
from infermesh_cli import main as cli
from fleet import spec as spec_mod
from fleet.paths import private_dir, private_file
from gateway import ledger
from gateway.keys import KeyAdmin

REPO = Path(__file__).resolve().parent.parent
LOCAL = spec_mod.read_config(spec_mod.stack_path("local"))


def run_cli(*argv: str) -> tuple[int, str, str]:
    """infermesh_cli.main.main in-process; stdout encodes strictly as UTF-8 (as a real one does), stderr
    with backslashreplace (Python's default for it)."""
    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_b, encoding="utf-8", errors="backslashreplace", write_through=True)
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out_b.getvalue().decode(), err_b.getvalue().decode()


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert err.isprintable() or err[:-1].isprintable(), repr(err)   # no raw control characters
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(path))
    return path


def write_stack(folder: Path, name: str, config: dict | None = None, text: str | bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"Pulumi.{name}.yaml"
    if text is None:
        text = yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in (config or LOCAL).items()}})
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---- durations, hours, tenant names, key ids ----------------------------------------------------

BAD_DURATIONS = ["", "²h", "⑴d", "٣h", "1e3h", "inf", "nanh", "-5h", "24 h", "h", "1.h", "99999999d", "\udcff",
                 "\x1b[2J", "2026-13-01", "٢٠٢٦-01-01", "0" * 5000 + "1h"]


@pytest.mark.parametrize("command", ["usage", "slo"])
@pytest.mark.parametrize("since", BAD_DURATIONS)
def test_durations_take_ascii_digits_only(state, command, since):
    rc, out, err = run_cli(command, "report", "--stack", "local", "--since", since)
    assert_one_line_error(rc, err, "--since")
    assert out == ""


def test_durations_and_dates_that_are_right():
    now = 1_800_000_000.0
    assert inputs.parse_since("30m", now) == now - 1800
    assert inputs.parse_since("24h", now) == now - 86400
    assert inputs.parse_since("1.5d", now) == now - 1.5 * 86400
    assert inputs.parse_since("3660d", now) == now - 3660 * 86400
    assert inputs.parse_since("2026-11-01T00:00", now) == 1793491200.0          # UTC unless it says
    assert inputs.parse_since("2026-11-01T01:00+01:00", now) == 1793491200.0
    assert inputs.parse_since(None) is None


@pytest.fixture
def tenant_acme(state, tmp_path) -> Path:
    rc, _, err = run_cli("keys", "create", "--stack", "local", "--tenant", "acme", "--tier", "hobby")
    assert rc == 0, err
    return state / "keys.db"


@pytest.mark.parametrize("hours", ["inf", "nan", "1e309", "1e3", "-1", "721", "720.5", "²", "⑴", "1_000", "", " 1"])
def test_debug_log_hours_are_finite_and_bounded(tenant_acme, hours):
    rc, _, err = run_cli("keys", "debug-log", "--stack", "local", "--tenant", "acme", "--hours", hours)
    assert_one_line_error(rc, err, "--hours")
    until = KeyAdmin(tenant_acme).conn.execute("SELECT debug_log_until FROM tenants").fetchone()[0]
    assert until is None                      # nothing stored


def test_debug_log_hours_within_the_bound_are_stored(tenant_acme):
    rc, out, err = run_cli("keys", "debug-log", "--stack", "local", "--tenant", "acme", "--hours", "720", "--json")
    assert rc == 0, err
    until = json.loads(out)["debug_log_until"]
    assert abs(until - (time.time() + 720 * 3600)) < 60
    rc, out, _ = run_cli("keys", "debug-log", "--stack", "local", "--tenant", "acme", "--hours", "0", "--json")
    assert rc == 0 and json.loads(out)["debug_log_until"] is None


BAD_TENANTS = ["", "a\nb", "a\x1b[31mb", "\x1b]0;owned\x07", "\udcff", "acme\udcff", " acme", "acme ", "a/b",
               ".acme", "é", "a" * 65, "a\u202eb", "=cmd()", "a\x00b"]


@pytest.mark.parametrize("tenant", BAD_TENANTS)
def test_tenant_names_match_the_documented_pattern(state, tenant):
    rc, out, err = run_cli("keys", "create", "--stack", "local", "--tenant", tenant, "--tier", "hobby")
    assert_one_line_error(rc, err, "--tenant", "not a tenant name")
    for argv in (["keys", "list", "--stack", "local", "--tenant", tenant],
                 ["keys", "debug-log", "--stack", "local", "--tenant", tenant, "--hours", "1"],
                 ["usage", "report", "--stack", "local", "--tenant", tenant]):
        rc, _, err = run_cli(*argv)
        assert_one_line_error(rc, err, "--tenant")
    assert not (state / "keys.db").exists() or KeyAdmin(state / "keys.db").list() == []


@pytest.mark.parametrize("tenant", ["acme", "Acme.Corp_2-b", "a" * 64, "7"])
def test_tenant_names_the_pattern_accepts(state, tenant):
    rc, out, err = run_cli("keys", "create", "--stack", "local", "--tenant", tenant, "--tier", "hobby", "--json")
    assert rc == 0, err
    assert json.loads(out)["tenant"] == tenant


@pytest.mark.parametrize("key_id", ["abc", "key_", "key_ABCDEF012345", "key_\udcff", "key_0123456789ab\n"])
def test_key_ids_are_checked_before_the_database(state, key_id):
    rc, _, err = run_cli("keys", "revoke", "--stack", "local", key_id)
    assert_one_line_error(rc, err, "key id")


def test_argparse_errors_are_one_line(state):
    for argv in (["usage", "report", "--stack", "local", "--format", "xml"], ["usage", "report"],
                 ["nope"], ["keys", "create", "--stack", "local", "--tenant", "a", "--tier"],
                 ["ops", "logs", "--stack", "local", "--host", "x", "--lines", "1e9"],
                 ["ops", "drain", "--stack", "local", "--host", "x", "--timeout", "inf"]):
        rc, out, err = run_cli(*argv)
        assert_one_line_error(rc, err, "--help")


def test_an_unexpected_error_is_one_line_too(state, monkeypatch):
    from infermesh_cli.commands import keys

    def boom(args):
        raise RuntimeError("bad\nthing")
    monkeypatch.setattr(keys, "run", boom)
    rc, _, err = run_cli("keys", "list", "--stack", "local")
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "internal error: RuntimeError: bad thing" in err


# ---- stack files --------------------------------------------------------------------------------

def laughs(inside_secret: bool) -> str:
    lines = ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    body = yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in LOCAL.items()}})
    where = "  infermesh:vastai-key:\n    secure: *l9\n" if inside_secret else "  infermesh:forecast: *l9\n"
    return "\n".join(lines) + "\n" + body.replace("config:\n", "config:\n" + where, 1)


def with_line(extra: str, **fields) -> str:
    """The local stack's text with `extra` as the config's first lines (keys the local stack does not
    set) and top-level `fields` changed."""
    body = yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in {**LOCAL, **fields}.items()}})
    return body.replace("config:\n", "config:\n" + extra, 1)


GATEWAY = LOCAL["gateway"]


BAD_STACK_FILES = {
    # name: (file content, words the one-line message must hold)
    "deep-list": ("config:\n  infermesh:gpus: " + "[" * 5000 + "]" * 5000 + "\n", ["nested more than 64"]),
    "deep-map": ("config:\n  infermesh:gpus: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", ["nested more than 64"]),
    "not-utf8": (with_line("  infermesh:x: caf\xe9\n").encode("latin-1"), ["not UTF-8", "0xe9"]),
    "utf16": (with_line("").encode("utf-16"), ["not UTF-8"]),
    "int-digits": (with_line("  infermesh:mesh: {port: " + "9" * 5000 + "}\n"), ["line 2", "cannot read"]),
    "int-huge": (with_line("", gateway={**GATEWAY, "max_body_bytes": 10**40}),
                 ["infermesh:gateway.max_body_bytes", "out of range"]),
    "float-inf": (with_line("  infermesh:planning: {headroom: .inf}\n"),
                  ["infermesh:planning.headroom", "out of range"]),
    "float-nan": (with_line("", gateway={**GATEWAY, "probe_interval_s": float("nan")}),
                  ["infermesh:gateway.probe_interval_s", "out of range"]),
    "float-1e400": (with_line("", gateway={**GATEWAY, "probe_interval_s": 12345.5}).replace("12345.5", "1.0e+400"),
                    ["infermesh:gateway.probe_interval_s", "out of range"]),
    "pool-replicas": (with_line("", pools=[{**LOCAL["pools"][0], "replicas": -10**20}, *LOCAL["pools"][1:]]),
                      ["infermesh:pools[0].replicas", "out of range"]),
    "bad-date": (with_line("  infermesh:gpus: {X1: 2026-02-30}\n"), ["line 2", "day is out of range"]),
    "nul": (with_line('  infermesh:x: "a\x00"\n'), ["#x0000", "not allowed"]),
    "laughs-in-secret": (laughs(inside_secret=True), ["secret", "alias"]),
    "laughs": (laughs(inside_secret=False), ["aliases expand to more than 100,000"]),
    "alias-in-secret": ("a: &s v1:abc\n" + with_line("  infermesh:vastai-key: {secure: *s}\n"), ["secret", "alias"]),
    "anchor-in-secret": (with_line("  infermesh:vastai-key: {secure: &s v1:abc}\n  infermesh:gpus: {X: *s}\n"),
                         ["secret", "anchor"]),
    "secret-not-string": (with_line("  infermesh:vastai-key: {secure: [1, 2]}\n"),
                          ["infermesh:vastai-key.secure", "one string"]),
    "cycle": ("config:\n  infermesh:forecast: &a [*a]\n", ["refers to a value that contains it"]),
    "too-large": ("config:\n" + "# padding\n" * 120_000, ["larger than 1024 KiB"]),
    "not-a-mapping": ("[1, 2]\n", ["config:"]),
    "name-with-newline": (None, ["pools[0] (evil\\n\\x1b[2Jpool).name", "should match pattern"]),
}


def bad_stack(tmp_path: Path, name: str) -> Path:
    text, _ = BAD_STACK_FILES[name]
    if name == "name-with-newline":
        config = copy.deepcopy(LOCAL)
        config["pools"][0]["name"] = "evil\n\x1b[2Jpool"
        return write_stack(tmp_path / "stacks", "bad", config)
    return write_stack(tmp_path / "stacks", "bad", text=text)


@pytest.mark.parametrize("name", sorted(BAD_STACK_FILES))
def test_bad_stack_files_give_one_line_naming_file_and_reason(tmp_path, state, name):
    bad_stack(tmp_path, name)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(spec_mod.SpecError) as e:
            spec_mod.load("bad", tmp_path / "stacks")
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "Pulumi.bad.yaml" in str(e.value) and str(e.value).isprintable()
    for needle in BAD_STACK_FILES[name][1]:
        assert needle in str(e.value), (needle, str(e.value))
    assert elapsed < 5 and peak < 64 << 20, (elapsed, peak)      # the alias bomb once took 45 s and 3 GB
    rc, _, err = run_cli("keys", "list", "--stack", "bad", "--stacks-dir", str(tmp_path / "stacks"))
    assert_one_line_error(rc, err, "Pulumi.bad.yaml")


def test_a_directory_is_not_a_stack_file(tmp_path, state):
    (tmp_path / "stacks" / "Pulumi.bad.yaml").mkdir(parents=True)
    rc, _, err = run_cli("keys", "list", "--stack", "bad", "--stacks-dir", str(tmp_path / "stacks"))
    assert_one_line_error(rc, err, "Pulumi.bad.yaml", "is a directory")


def test_other_yaml_files_get_the_same_limits(tmp_path):
    (tmp_path / "hosts.yaml").mkdir()
    with pytest.raises(spec_mod.SpecError, match="hosts.yaml: is a directory, not a hosts file"):
        spec_mod.read_yaml(tmp_path / "hosts.yaml", "hosts file")
    (tmp_path / "bomb.yaml").write_text(laughs(inside_secret=False))
    with pytest.raises(spec_mod.SpecError, match="aliases expand"):
        spec_mod.read_yaml(tmp_path / "bomb.yaml", "hosts file")


def test_the_shipped_stacks_and_ordinary_aliases_still_load(tmp_path):
    for stack in ("local", "local-ha", "staging", "prod"):
        spec_mod.load(stack)
    config = copy.deepcopy(LOCAL)
    knobs = {"ttft_ms": 7, "itl_ms": 1}
    sims = [p for p in config["pools"] if "sim" in p or p["provider"].startswith("sim")][:2]
    for p in sims:
        p["sim"] = knobs                     # one object twice: PyYAML writes an anchor and an alias
    path = write_stack(tmp_path / "stacks", "aliased", config)
    assert "&id001" in path.read_text() and "*id001" in path.read_text()
    spec = spec_mod.load("aliased", tmp_path / "stacks")
    assert [spec.pool(p["name"]).sim.ttft_ms for p in sims] == [7, 7]


# ---- what the CLI prints: CSV and tables --------------------------------------------------------

HOSTILE_MODELS = ["=HYPERLINK(\"http://evil\",\"x\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\tx", "\rx",
                  "\x1b[31mred\x1b[0m", "line\nbreak", "rtl\u202eexe.txt", "plain-model"]


@pytest.fixture
def hostile_ledger(state) -> Path:
    led = ledger.Ledger(state / "ledger.db")
    try:
        for i, model in enumerate(HOSTILE_MODELS):
            led.record(ledger.UsageRecord(request_id=f"r{i}", tenant="acme", key_id="key_000000000000", tier="hobby",
                                          route="chat", requested_model=model, status=404, prompt_tokens=3))
    finally:
        led.close()
    return state / "ledger.db"


@pytest.mark.parametrize("records", [False, True])
def test_csv_export_neutralises_formulas(hostile_ledger, records):
    rc, out, err = run_cli("usage", "report", "--stack", "local", "--format", "csv", *(["--records"] * records))
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out, newline="")))
    column = "requested_model" if records else "model"
    models = sorted(r[column] for r in rows)
    expected = sorted(("'" + m) if m[0] in "=+-@\t\r" else m for m in HOSTILE_MODELS)
    assert models == expected
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), (column, value)
    assert all(r["prompt_tokens"] == "3" for r in rows)        # numbers stay numbers


def test_csv_cell_leaves_numbers_and_plain_text():
    assert inputs.csv_cell(-3) == -3 and inputs.csv_cell(0.5) == 0.5 and inputs.csv_cell(None) is None
    assert inputs.csv_cell("acme") == "acme" and inputs.csv_cell("a=b") == "a=b"
    assert [inputs.csv_cell(p + "x") for p in "=+-@\t\r"] == ["'" + p + "x" for p in "=+-@\t\r"]


def test_table_escapes_control_characters(hostile_ledger):
    rc, out, err = run_cli("usage", "report", "--stack", "local")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 + len(HOSTILE_MODELS)               # a newline in a name does not add a row
    assert all(line.isprintable() for line in lines), out
    assert "\\x1b[31mred\\x1b[0m" in out and "line\\nbreak" in out and "rtl\\u202eexe.txt" in out
    rc, out, _ = run_cli("usage", "report", "--stack", "local", "--format", "json")
    assert sorted(r["model"] for r in json.loads(out)) == sorted(HOSTILE_MODELS)   # JSON keeps them exact, escaped
    assert "\x1b" not in out


def test_keys_list_escapes_names_already_in_the_database(state):
    admin = KeyAdmin(private_file(state / "keys.db"))
    admin.create("oldname", "hobby")
    with admin.conn:                        # a name written before names were checked
        admin.conn.execute("UPDATE tenants SET name = ? WHERE name = 'oldname'", ("old\x1b[2Jname",))
        admin.conn.execute("UPDATE keys SET tenant = ? WHERE tenant = 'oldname'", ("old\x1b[2Jname",))
    with pytest.raises(ValueError, match="not a tenant name"):      # the key store itself refuses such names now
        admin.create("new\x1b[2Jname", "hobby")
    rc, out, err = run_cli("keys", "list", "--stack", "local")
    assert rc == 0, err
    assert "old\\x1b[2Jname" in out and "\x1b" not in out


# ---- files that hold prompts or key hashes ------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_keys_db_is_0600_in_a_0700_folder(tmp_path, monkeypatch, loose_umask):
    state = tmp_path / "new" / "state"
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(state))
    rc, _, err = run_cli("keys", "create", "--stack", "local", "--tenant", "acme", "--tier", "hobby")
    assert rc == 0, err
    assert mode(state) == 0o700 and mode(state.parent) == 0o700
    assert mode(state / "keys.db") == 0o600


def test_ledger_and_its_wal_are_0600_in_a_0700_folder(tmp_path, loose_umask):
    path = tmp_path / "state" / "ledger.db"
    led = ledger.Ledger(path)
    try:
        led.record(ledger.UsageRecord(request_id="r", tenant="acme", key_id="k", tier="hobby", route="chat",
                                      requested_model="m"))
        led.debug_log("r", "acme", "a prompt", "a completion", time.time() + 60)
        files = [p for p in path.parent.iterdir() if p.name.startswith("ledger.db")]
        assert {p.name for p in files} >= {"ledger.db", "ledger.db-wal", "ledger.db-shm"}
        assert all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}
        assert mode(path.parent) == 0o700
    finally:
        led.close()


def test_an_old_world_readable_ledger_is_tightened(tmp_path, loose_umask):
    path = tmp_path / "ledger.db"
    ledger.connect(path).close()
    os.chmod(path, 0o644)
    ledger.connect(path).close()
    assert mode(path) == 0o600


def test_a_running_local_stack_keeps_its_state_private(local_stack):
    """The gateway process (not the CLI) creates ledger.db; `up` creates the state dir."""
    local_stack.key("perm", "hobby")
    state = local_stack.state
    assert mode(state) == 0o700
    for name in ("ledger.db", "keys.db"):
        assert mode(state / name) == 0o600, name
    assert mode(state / "logs") == 0o700


def test_folders_are_tightened_only_where_they_are_ours(tmp_path, loose_umask):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for d in (mine, theirs):
        d.mkdir()
        os.chmod(d, 0o755)
    private_dir(mine, tighten=True)
    private_dir(theirs)
    assert (mode(mine), mode(theirs)) == (0o700, 0o755)


# ---- end to end, as a process -------------------------------------------------------------------

def test_as_a_process_bad_bytes_and_bombs_end_in_one_line(tmp_path):
    env = {**os.environ, "INFERMESH_STATE_DIR": str(tmp_path / "state")}
    stacks = tmp_path / "stacks"
    write_stack(stacks, "bomb", text=laughs(inside_secret=True))
    cases = [
        ([b"keys", b"create", b"--stack", b"local", b"--tenant", b"caf\xe9", b"--tier", b"hobby"], b"--tenant"),
        ([b"usage", b"report", b"--stack", b"local", b"--since", "²h".encode()], b"--since"),
        ([b"keys", b"debug-log", b"--stack", b"local", b"--tenant", b"acme", b"--hours", b"inf"], b"--hours"),
        ([b"keys", b"list", b"--stack", b"bomb", b"--stacks-dir", str(stacks).encode()], b"secret"),
    ]
    for argv, needle in cases:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable.encode(), b"-m", b"infermesh_cli", *argv], env=env, cwd=REPO,
                           capture_output=True, timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr and needle in r.stderr, r.stderr
        assert r.stdout == b"" and time.monotonic() - t0 < 30


# ---- fuzzing -------------------------------------------------------------------------------------

NASTY = st.sampled_from(["", "\n", "\x1b[2J", "\udcff", "²h", "⑴d", "inf", "nan", "-1", "1e309", "9" * 5000, "0",
                         "24h", "acme", "key_0123456789ab", "=1+1", " ", "\x00", "\u202e", "--stack"])
TEXT = st.text(st.characters(exclude_categories=()), max_size=40)   # surrogates (invalid UTF-8 argv) included
VALUE = st.one_of(NASTY, TEXT)
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_state(tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("fuzz")
    KeyAdmin(private_file(state / "keys.db")).create("acme", "hobby")
    return state


def _argvs(v1: str, v2: str) -> list[list[str]]:
    return [["usage", "report", "--stack", "local", "--since", v1],
            ["usage", "report", "--stack", "local", "--tenant", v1, "--since", v2],
            ["slo", "report", "--stack", "local", "--since", v1],
            ["keys", "debug-log", "--stack", "local", "--tenant", v1, "--hours", v2],
            ["keys", "create", "--stack", "local", "--tenant", v1, "--tier", v2],
            ["keys", "list", "--stack", "local", "--tenant", v1],
            ["keys", "revoke", "--stack", "local", v1],
            ["usage", "report", "--stack", v1],
            ["ops", "logs", "--stack", "local", "--host", "n", "--lines", v1]]


@FUZZ
@given(which=st.integers(0, 8), v1=VALUE, v2=VALUE)
def test_fuzz_command_arguments(fuzz_state, monkeypatch, which, v1, v2):
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(fuzz_state))
    argv = _argvs(v1, v2)[which]
    rc, out, err = run_cli(*argv)
    assert "Traceback" not in err
    if rc == 0:     # only a well-formed request on the existing tenant, or an ISO date on an empty ledger
        assert err == ""
        return
    assert_one_line_error(rc, err)


def _fuzz_value():
    scalars = st.one_of(st.integers(min_value=-(10**30), max_value=10**30), st.floats(), st.booleans(), st.none(),
                        TEXT)
    return st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), kids, max_size=3)),
                        max_leaves=12)


def _nested(depth: int, opener: str) -> str:
    return "config:\n  infermesh:gpus: " + opener * depth + "1" * (opener == "{a: ") + \
        ("}" if opener == "{a: " else "]") * depth + "\n"


STACK_TEXT = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(_nested, st.one_of(st.integers(1, 3000), st.sampled_from([61, 62, 63, 64, 400, 2000])),
              st.sampled_from(["[", "{a: "])).map(str.encode),
)


@st.composite
def mutated_stack(draw) -> bytes:
    """The local stack with one field, at any depth, replaced by a fuzzed value (dumped as YAML)."""
    config = copy.deepcopy(LOCAL)
    node: object = config
    for _ in range(draw(st.integers(1, 4))):
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node, key=str)))
            if not isinstance(node[key], (dict, list)) or draw(st.booleans()):
                node[key] = draw(_fuzz_value())
                break
            node = node[key]
        elif isinstance(node, list) and node:
            i = draw(st.integers(0, len(node) - 1))
            if not isinstance(node[i], (dict, list)) or draw(st.booleans()):
                node[i] = draw(_fuzz_value())
                break
            node = node[i]
        else:
            break
    try:
        return yaml.safe_dump({"config": {f"infermesh:{k}": v for k, v in config.items()}},
                              allow_unicode=True).encode("utf-8", "surrogatepass")
    except yaml.YAMLError:
        return b"config: {}\n"


@FUZZ
@given(content=st.one_of(STACK_TEXT, mutated_stack()))
def test_fuzz_stack_files(tmp_path_factory, monkeypatch, content):
    folder = tmp_path_factory.mktemp("fz")
    monkeypatch.setenv("INFERMESH_STATE_DIR", str(folder / "state"))
    write_stack(folder, "fz", text=content)
    rc, out, err = run_cli("keys", "list", "--stack", "fz", "--stacks-dir", str(folder))
    assert "Traceback" not in err
    if rc == 0:     # a fuzzed value the spec accepts
        assert err == ""
        return
    assert_one_line_error(rc, err, "Pulumi.fz.yaml")
