"""sgdpo_fast.data: JSONL validation (records) and the code-checked task set (tasks)."""
import json
import os
import re
import sys
import types
from collections import Counter

import pytest

from sgdpo_fast.data import (DataError, accuracy, build_tasks, bundled_path, check,
                             load_preferences, load_sft, read_jsonl, write_jsonl)
from sgdpo_fast.data import tasks as tasks_mod

FAMILIES = {"arithmetic", "counting", "sorting", "formatting", "extraction", "sequence"}
PROBE = {"letters", "calendar", "lists", "compare"}
GOOD_PAIR = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------
# records: validation errors name the file and the line
# ---------------------------------------------------------------------------

BAD_PAIR_LINES = [
    pytest.param('{"prompt": "x", "chosen": "a", ', "invalid JSON", id="bad-json"),
    pytest.param('["prompt", "chosen", "rejected"]', "expected a JSON object, got array",
                 id="not-object"),
    pytest.param('{"prompt": "x", "chosen": "a"}', "missing key 'rejected'", id="missing-key"),
    pytest.param('{"prompt": "x", "chosen": 3, "rejected": "b"}',
                 "key 'chosen' must be a string, got number", id="wrong-type"),
    pytest.param('{"prompt": "x", "chosen": "a", "rejected": null}',
                 "key 'rejected' must be a string, got null", id="null"),
    pytest.param('{"prompt": "   ", "chosen": "a", "rejected": "b"}',
                 "key 'prompt' is an empty string", id="empty-string"),
    pytest.param('{"prompt": "x", "chosen": "same", "rejected": " same "}',
                 "'chosen' and 'rejected' are identical", id="chosen-equals-rejected"),
]


@pytest.mark.parametrize("bad_line, problem", BAD_PAIR_LINES)
def test_bad_preference_line_names_file_and_line(tmp_path, bad_line, problem):
    path = _write_lines(tmp_path / "prefs.jsonl", [json.dumps(GOOD_PAIR), json.dumps(GOOD_PAIR),
                                                   bad_line, json.dumps(GOOD_PAIR)])
    with pytest.raises(DataError) as err:
        load_preferences(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert problem in msg


@pytest.mark.parametrize("bad_line, problem", [
    ('{"prompt": "x"}', "missing key 'response'"),
    ('{"prompt": "x", "response": ["a"]}', "key 'response' must be a string, got array"),
    ('{"prompt": "x", "response": ""}', "key 'response' is an empty string"),
    ('{"prompt": 1, "response": "a"}', "key 'prompt' must be a string, got number"),
])
def test_bad_sft_line_names_file_and_line(tmp_path, bad_line, problem):
    path = _write_lines(tmp_path / "sft.jsonl", ['{"prompt": "p", "response": "r"}', bad_line])
    with pytest.raises(DataError, match=r"sft\.jsonl:2: ") as err:
        load_sft(path)
    assert problem in str(err.value)


def test_blank_lines_skipped_but_counted(tmp_path):
    good = json.dumps(GOOD_PAIR)
    path = _write_lines(tmp_path / "p.jsonl", ["", good, "   ", "", good])
    assert len(load_preferences(path)) == 2
    path = _write_lines(tmp_path / "q.jsonl", ["", good, "   ", "", '{"prompt": "x"}'])
    with pytest.raises(DataError) as err:
        load_preferences(path)
    assert str(err.value).startswith(f"{path}:5: ")


def test_extra_keys_are_kept(tmp_path):
    rec = dict(GOOD_PAIR, id="a1", meta={"score": 0.5})
    path = _write_lines(tmp_path / "p.jsonl", [json.dumps(rec)])
    assert load_preferences(path) == [rec]
    sft = {"prompt": "p", "response": "r", "source": "test"}
    path = _write_lines(tmp_path / "s.jsonl", [json.dumps(sft)])
    assert load_sft(path) == [sft]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        load_sft(str(path))
    assert read_jsonl(path) == []  # the plain reader accepts an empty file


def test_missing_file_names_path(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="nope.jsonl"):
        load_preferences(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sft(path)


def test_bundled_source_names():
    assert load_sft("bundled:heldout") == read_jsonl(bundled_path("heldout"))
    with pytest.raises(DataError, match="bundled:test"):
        load_sft("bundled:test")
    with pytest.raises(DataError, match=r"train\.jsonl:1: missing key 'chosen'"):
        load_preferences("bundled:train")  # task records are SFT data, not pairs


# ---------------------------------------------------------------------------
# records: reading and writing
# ---------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path):
    recs = [{"prompt": "Café?", "response": "naïve — 日本", "n": 3, "x": [1, None, True]},
            {"prompt": "q", "response": "a\nb"}]
    path = tmp_path / "deep" / "er" / "out.jsonl"
    assert write_jsonl(path, recs) == str(path)
    assert read_jsonl(path) == recs
    assert load_sft(str(path)) == recs
    raw = path.read_text(encoding="utf-8")
    assert "Café" in raw and "日本" in raw  # ensure_ascii=False
    assert raw.count("\n") == 2 and all(json.loads(line) for line in raw.splitlines())
    assert os.listdir(path.parent) == ["out.jsonl"]  # no .tmp left behind
    write_jsonl(path, recs[:1])  # overwrite
    assert read_jsonl(path) == recs[:1]


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(TypeError):
        write_jsonl(path, [{"a": 2}, {"b": {1, 2}}])  # a set is not JSON
    with pytest.raises(TypeError):
        write_jsonl(path, [{"a": 2}, ["not", "a", "dict"]])
    with pytest.raises(ValueError):
        write_jsonl(path, [{"a": float("nan")}])
    assert read_jsonl(path) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_deeply_nested_json_is_a_data_error(tmp_path):
    """Item 11: JSON nested 100k deep is a DataError naming file and line, not RecursionError."""
    deep = '{"prompt": "p", "chosen": "a", "rejected": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = _write_lines(tmp_path / "deep.jsonl", [json.dumps(GOOD_PAIR), deep])
    with pytest.raises(DataError, match=r"deep\.jsonl:2: .*nested too deeply"):
        load_preferences(path)
    with pytest.raises(DataError, match=r"deep\.jsonl:2: "):
        read_jsonl(path)


@pytest.mark.parametrize("key", ["prompt", "chosen", "rejected"])
def test_a_lone_surrogate_names_file_line_and_key(tmp_path, key):
    """Item 11: "\\ud800" is valid JSON but not text a tokenizer can take."""
    rec = json.dumps(GOOD_PAIR).replace(f'"{GOOD_PAIR[key]}"', '"ok \\ud800 then"')
    path = _write_lines(tmp_path / "s.jsonl", [json.dumps(GOOD_PAIR), rec])
    with pytest.raises(DataError) as err:
        load_preferences(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: ") and f"'{key}'" in msg and "surrogate" in msg, msg


def test_read_jsonl_bad_json_line(tmp_path):
    path = _write_lines(tmp_path / "r.jsonl", ['{"a": 1}', "", "{oops}"])
    with pytest.raises(DataError, match=r"r\.jsonl:3: invalid JSON"):
        read_jsonl(path)


# ---------------------------------------------------------------------------
# records: Hugging Face sources
# ---------------------------------------------------------------------------

def test_hf_without_datasets_says_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_preferences("hf:some/dataset", online=True)


def test_hf_hub_names_need_an_explicit_opt_in(monkeypatch):
    """Item 7: offline by default; a Hub name (not a local folder) is refused at once, naming
    the opt-in, and `datasets` is not even asked."""
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: calls.append((name, split)) or [GOOD_PAIR]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match="--online") as err:
        load_preferences("hf:org/prefs")
    assert str(err.value).startswith("hf:org/prefs[train]: ")
    assert calls == []
    assert load_preferences("hf:org/prefs", online=True) == [GOOD_PAIR]


def test_hf_rows_are_validated_with_row_index(monkeypatch):
    calls = []
    rows = [dict(GOOD_PAIR), dict(GOOD_PAIR), {"prompt": "x", "chosen": "a", "rejected": 5}]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: calls.append((name, split)) or rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError) as err:
        load_preferences("hf:org/prefs:test", online=True)
    assert str(err.value).startswith("hf:org/prefs[test] row 2: key 'rejected' must be a string")
    assert calls == [("org/prefs", "test")]
    rows.pop()  # drop the bad row
    assert load_preferences("hf:org/prefs2", online=True) == [GOOD_PAIR, GOOD_PAIR]
    assert calls[-1] == ("org/prefs2", "train")  # the split defaults to train
    rows.clear()
    with pytest.raises(DataError, match=r"hf:org/x\[train\]: no records"):
        load_sft("hf:org/x", online=True)


def test_hf_local_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "p", "response": "r"}] * 2),
        "test": datasets.Dataset.from_list([{"prompt": "p", "response": "r"},
                                            {"prompt": "p", "response": " "}]),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    assert load_sft(f"hf:{tmp_path / 'ds'}") == [{"prompt": "p", "response": "r"}] * 2
    with pytest.raises(DataError, match=r"\[test\] row 1: key 'response' is an empty string"):
        load_sft(f"hf:{tmp_path / 'ds'}:test")


# ---------------------------------------------------------------------------
# tasks: the bundled files
# ---------------------------------------------------------------------------

def test_bundled_files_load_and_cover_all_families():
    train, heldout = load_sft("bundled:train"), load_sft(bundled_path("heldout"))
    ids = [r["id"] for r in train + heldout]
    assert len(ids) == len(set(ids))
    assert set(Counter(r["family"] for r in train)) == FAMILIES
    # the quality study's power: >= 300 held-out and >= 900 train tasks, families balanced
    assert Counter(r["family"] for r in train) == {f: 150 for f in FAMILIES}
    assert Counter(r["family"] for r in heldout) == {f: 50 for f in FAMILIES}
    probe = load_sft("bundled:probe")
    assert Counter(r["family"] for r in probe) == {f: 40 for f in PROBE}
    assert not PROBE & FAMILIES
    for rec in train + heldout + probe:
        assert set(rec) == {"id", "family", "prompt", "response", "check"}
    ids = [r["id"] for r in train + heldout + probe]
    assert len(ids) == len(set(ids))


def test_bundled_files_match_generator():
    train, heldout = build_tasks(150, 50, seed=0)
    assert read_jsonl(bundled_path("train")) == train
    assert read_jsonl(bundled_path("heldout")) == heldout
    assert read_jsonl(bundled_path("probe")) == tasks_mod.build_probe(40, seed=0)
    assert tasks_mod.main(["--check"]) == 0


def test_check_flag_reports_a_stale_file(tmp_path, capsys):
    d = ["--dir", str(tmp_path)]
    assert tasks_mod.main(["--check", *d]) == 1  # missing files
    assert tasks_mod.main(["--write", *d]) == 0
    assert tasks_mod.main(["--check", *d]) == 0
    recs = read_jsonl(tmp_path / "probe.jsonl")
    write_jsonl(tmp_path / "probe.jsonl", recs[:-1])
    assert tasks_mod.main(["--check", *d]) == 1
    assert "probe.jsonl is out of date" in capsys.readouterr().out


def test_probe_prompts_are_not_in_the_trained_templates():
    train, heldout = load_sft("bundled:train"), load_sft("bundled:heldout")
    probe = load_sft("bundled:probe")
    trained = {r["prompt"] for r in train + heldout}
    assert not trained & {r["prompt"] for r in probe}
    # no probe instruction sentence occurs in a trained prompt
    tails = {r["prompt"].rsplit("? ", 1)[-1].rsplit(". ", 1)[-1] for r in probe}
    assert not [t for t in tails if any(t in p for p in trained)], tails
    assert {r["check"]["kind"] for r in probe} == {"number", "choice"}


def test_distractors_are_wrong_answers_in_the_reference_format():
    recs = load_sft("bundled:train") + load_sft("bundled:heldout") + load_sft("bundled:probe")
    for rec in recs:
        d = tasks_mod.distractor(rec)
        assert not check(rec, d), (rec, d)
        if rec["check"]["kind"] != "token":
            assert len(d.split()) == len(rec["response"].split()), (rec, d)
    by_id = {r["id"]: r for r in load_sft("bundled:probe")}
    cmp_ = next(r for r in by_id.values() if r["family"] == "compare")
    nums = {int(x) for x in re.findall(r"\d+", cmp_["prompt"])}
    assert {int(tasks_mod.distractor(cmp_)), cmp_["check"]["answer"]} == nums
    day = {**DAY, "response": "Tuesday"}
    assert tasks_mod.distractor(day) == "Wednesday"
    assert tasks_mod.distractor({**DAY, "check": {**DAY["check"], "answer": "Sunday",
                                                  "exclude": ["Monday"]}}) == "Tuesday"
    assert tasks_mod.distractor(SORT) == "3, 1, 7, 12"


@pytest.mark.parametrize("style", tasks_mod.STYLES)
def test_styled_references_pass_their_checker(style):
    recs = load_sft("bundled:train") + load_sft("bundled:heldout") + load_sft("bundled:probe")
    for rec in recs:
        assert check(rec, tasks_mod.styled_response(rec, style)), (style, rec)
    assert tasks_mod.styled_response(ADD, "sentence") == "The answer is 42."
    with pytest.raises(ValueError, match="style"):
        tasks_mod.styled_response(ADD, "verbose")


def test_every_reference_passes_its_checker():
    train, heldout = build_tasks(40, 40, seed=123)
    for rec in (train + heldout + read_jsonl(bundled_path("train"))
                + tasks_mod.build_probe(40, seed=123) + read_jsonl(bundled_path("probe"))):
        assert check(rec, rec["response"]), rec
        assert check(rec, f"Answer: {rec['response']}."), rec
        assert check(rec, f'\n  "{rec["response"]}"\nsome explanation'), rec


def _wrong_answers(rec):
    """Plausible but wrong answers, derived from the reference."""
    spec = rec["check"]
    ans = spec["answer"]
    if spec["kind"] == "number":
        return [str(ans + 1), str(ans - 1), str(ans * 10 + 1), "", "I don't know"]
    if spec["kind"] == "int_list":
        return [", ".join(map(str, reversed(ans))), ", ".join(map(str, ans[:-1])),
                ", ".join(map(str, ans + [ans[-1] + 1]))]
    if spec["kind"] == "exact":
        words = ans.split()
        wrong = [ans.lower() + "s", ans + " x", ""]
        if ans.isupper():
            wrong.append(ans.title())
        if len(words) > 1:
            wrong.append(" ".join(reversed(words)))
        return wrong
    if spec["kind"] == "token":
        return [ans[:-1], "x" + ans, ans.replace("@", " at ") if "@" in ans else "Atlantis", ""]
    if spec["kind"] == "choice":
        others = [o for o in spec["options"] if o.casefold() != ans.casefold()
                  and o not in spec.get("exclude", ())]
        wrong = [others[0], f"{others[-1]} or {ans}", ans + "s", "", "I don't know"]
        return wrong + [" ".join(spec["options"])] if len(spec["options"]) < 10 else wrong
    raise AssertionError(spec)


def test_wrong_answers_fail_in_every_family():
    failed = Counter()
    for rec in (read_jsonl(bundled_path("train")) + read_jsonl(bundled_path("heldout"))
                + read_jsonl(bundled_path("probe"))):
        for wrong in _wrong_answers(rec):
            assert not check(rec, wrong), (rec, wrong)
            failed[rec["family"]] += 1
    assert set(failed) == FAMILIES | PROBE


def _rec(family, kind, answer, **extra):
    return {"id": "t", "family": family, "prompt": "?", "response": str(answer),
            "check": {"kind": kind, "answer": answer, **extra}}


ADD = _rec("arithmetic", "number", 42)
SORT = _rec("sorting", "int_list", [1, 3, 7, 12])
UPPER = _rec("formatting", "exact", "GREEN APPLE")
REVERSE = _rec("formatting", "exact", "green blue red")
EMAIL = _rec("extraction", "token", "anna.lee@example.com", max_words=7)
CITY = _rec("extraction", "token", "New York", max_words=8)
NUM = _rec("extraction", "number", 17, max_words=7)
SEQ = _rec("sequence", "number", 3)
LETTER = _rec("letters", "choice", "g", options=list("abcdefghijklmnopqrstuvwxyz"), max_words=12)
DAY = _rec("calendar", "choice", "Tuesday", max_words=12, exclude=["Monday"],
           options=["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])
LAST = _rec("lists", "choice", "lamp", options=["cat", "river", "lamp"], max_words=12)
CMP = _rec("compare", "number", 52, max_words=10)


@pytest.mark.parametrize("rec, text, expected", [
    (ADD, "42", True), (ADD, " Answer: 42.", True), (ADD, "The answer is 42", True),
    (ADD, "**42**", True), (ADD, "17 + 25 = 42", True), (ADD, "42.0", True),
    (ADD, "\n\n'42'\nBecause 17 + 25 is 42.", True), (ADD, "42 apples", True),
    (ADD, "41", False), (ADD, "420", False), (ADD, "4.2", False), (ADD, "17 + 25", False),
    (ADD, "I think\n42", False), (ADD, "-42", False), (ADD, "forty-two", False),
    (SEQ, "Three", True), (SEQ, "three.", True), (SEQ, "thirteen", False),
    (SORT, "1, 3, 7, 12", True), (SORT, "1 3 7 12", True), (SORT, "1,3,7,12", True),
    (SORT, "[1, 3, 7, 12]", True), (SORT, "Answer: 1, 3, 7, 12.", True),
    (SORT, "1, 3, 12, 7", False), (SORT, "1, 3, 7", False), (SORT, "1, 3, 7, 12, 12", False),
    (SORT, "13, 7, 12", False), (SORT, "1, 3, 7, 1, 2", False),
    (UPPER, "GREEN APPLE", True), (UPPER, '"GREEN APPLE".', True), (UPPER, "GREEN   APPLE", True),
    (UPPER, "Green Apple", False), (UPPER, "green apple", False), (UPPER, "GREENAPPLE", False),
    (UPPER, "GREEN APPLE!", False),
    (REVERSE, "green blue red", True), (REVERSE, "Answer: `green blue red`", True),
    (REVERSE, "red blue green", False), (REVERSE, "green, blue, red", False),
    (EMAIL, "anna.lee@example.com", True), (EMAIL, "Anna.Lee@Example.COM.", True),
    (EMAIL, "The email is anna.lee@example.com", True), (EMAIL, "<anna.lee@example.com>", True),
    (EMAIL, "anna.lee@example.com.au", False), (EMAIL, "hanna.lee@example.com", False),
    (EMAIL, "anna.lee@example.org", False), (EMAIL, "anna.lee", False),
    (EMAIL, "Please write to anna.lee@example.com for details about the trip.", False),
    (CITY, "New York", True), (CITY, "new york.", True), (CITY, "The city is New York.", True),
    (CITY, "New  York", True), (CITY, "York", False), (CITY, "New Yorker", False),
    (CITY, "Boston", False), (CITY, "New Jersey", False),
    (CITY, "Maria moved to New York last year to start a new job.", False),
    (NUM, "17", True), (NUM, "The number is 17.", True), (NUM, "71", False),
    (NUM, "Maria bought 17 apples at the market yesterday.", False),
    (LETTER, "g", True), (LETTER, "G.", True), (LETTER, "The first letter is g.", True),
    (LETTER, '"G"', True), (LETTER, "garden", False), (LETTER, "h", False),
    (LETTER, 'The first letter of the word "giraffe" is "G".', True),
    (LETTER, "It is a g", False), (LETTER, 'The word "happy" ends with the letter "H".', False),
    (LETTER, "The letter g is the first letter of the word that you gave me here", False),
    (DAY, "Tuesday", True), (DAY, "tuesday.", True), (DAY, "Tuesday comes after Monday.", True),
    (DAY, "Answer: TUESDAY", True), (DAY, "After Monday comes Tuesday", True),
    (DAY, "The day after Monday is Saturday", False), (DAY, "Monday", False),
    (DAY, "Saturday", False), (DAY, "Tue", False), (DAY, "Tuesdays", False),
    (DAY, "Wednesday or Tuesday", False),
    (LAST, "lamp", True), (LAST, "The last item is lamp.", True), (LAST, "cat, river, lamp", False),
    (LAST, "lamps", False), (LAST, "river", False),
    (CMP, "52", True), (CMP, "52 is larger.", True), (CMP, "37 < 52", False),
    (CMP, "The larger number is 52.", True), (CMP, "37 is smaller than 52", False),
    (CMP, "Of the two numbers that you have given me, the larger is 52", False),
])
def test_checker_leniency_and_strictness(rec, text, expected):
    assert check(rec, text) is expected


def test_check_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown check kind"):
        check(_rec("arithmetic", "regex", "x"), "x")
    with pytest.raises(ValueError, match="no 'check'"):
        check({"id": "a", "family": "arithmetic"}, "1")


# ---------------------------------------------------------------------------
# tasks: generation
# ---------------------------------------------------------------------------

def test_build_tasks_deterministic_unique_and_disjoint():
    train, heldout = build_tasks(30, 20, seed=7)
    assert (train, heldout) == build_tasks(30, 20, seed=7)
    assert build_tasks(30, 20, seed=8) != (train, heldout)
    assert len(train) == 30 * len(FAMILIES) and len(heldout) == 20 * len(FAMILIES)
    train_prompts = [r["prompt"] for r in train]
    heldout_prompts = [r["prompt"] for r in heldout]
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(heldout_prompts)) == len(heldout_prompts)
    assert not set(train_prompts) & set(heldout_prompts)
    ids = [r["id"] for r in train + heldout]
    assert len(set(ids)) == len(ids)
    # the held-out split does not depend on the train size
    assert build_tasks(3, 20, seed=7)[1] == heldout
    assert all(json.loads(json.dumps(r)) == r for r in train + heldout)


def test_tasks_vary_in_difficulty_within_families():
    train, _ = build_tasks(40, 0, seed=0)
    fam = {f: [r for r in train if r["family"] == f] for f in FAMILIES}
    assert all(len({r["response"] for r in recs}) >= 5 for recs in fam.values())
    arith = [r["check"]["answer"] for r in fam["arithmetic"]]
    assert min(arith) < 10 and max(arith) > 50
    assert {len(r["check"]["answer"]) for r in fam["sorting"]} == {4, 5, 6}
    upper = [r for r in fam["formatting"] if "uppercase" in r["prompt"]]
    assert upper and len(upper) < len(fam["formatting"])  # both uppercase and reverse
    assert len({len(r["response"].split()) for r in upper}) >= 3
    assert any("letter" in r["prompt"] for r in fam["counting"])
    assert any("words" in r["prompt"] for r in fam["counting"])
    for what in ("the number", "the email address", "city"):
        assert any(what in r["prompt"] for r in fam["extraction"]), what
    steps = set()
    for r in fam["sequence"]:
        shown = [int(x) for x in re.findall(r"\d+", r["prompt"])]
        steps.add((shown[1] > shown[0], shown[2] - shown[1] == shown[1] - shown[0]))
    assert steps == {(True, True), (False, True), (True, False)}  # up, down, geometric


def test_build_tasks_rejects_bad_sizes():
    with pytest.raises(ValueError):
        build_tasks(-1, 2)
    with pytest.raises(ValueError):
        build_tasks(2, 1.5)


# ---------------------------------------------------------------------------
# tasks: accuracy
# ---------------------------------------------------------------------------

def test_accuracy_hand_example():
    recs = [dict(ADD, id="a1"), dict(ADD, id="a2"), dict(SORT, id="s1"), dict(UPPER, id="u1")]
    answers = ["42", "43", "1, 3, 7, 12", "green apple"]
    result = accuracy(recs, answers)
    assert result["n"] == 4
    assert result["overall"] == pytest.approx(0.5)
    assert result["by_family"] == {"arithmetic": 0.5, "sorting": 1.0, "formatting": 0.0}
    by_id = {"a1": "42", "a2": "42", "u1": "GREEN APPLE"}  # s1 missing -> wrong
    assert accuracy(recs, by_id)["overall"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        accuracy(recs, answers[:3])
    with pytest.raises(ValueError):
        accuracy([], [])
