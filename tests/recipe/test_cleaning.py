"""Corpus cleaning on small Korean/English fixtures written for these tests: normalisation, each
quality filter, exact and near dedup, the report, and `fusetune data` on a file."""
import importlib.util
import json
import subprocess
import sys

import pytest

from fusetune.recipe.cleaning import Filters, clean_rows, hangul_ratio, normalize, repetition

STORY = ("서울의 봄은 짧지만 아름답다. 벚꽃이 피는 사월이면 사람들은 한강 공원에 모여 도시락을 먹고, 아이들은 연을 "
         "날리며 하루를 보낸다. 저녁이 되면 강바람이 차가워지고 사람들은 천천히 집으로 돌아간다.")


def test_normalize():
    assert normalize("ＡＢＣ　１２３") == "ABC 123"  # full-width letters and the ideographic space
    assert normalize("Fish &amp; chips<br/>are <b>good</b>") == "Fish & chips are good"
    assert normalize("\n  one \t two  \n\n\n\n three  ") == "  one two\n\n three"  # indentation stays
    assert normalize("ㅋㅋㅋ 좋아요 ㅠㅠ") == "ㅋㅋㅋ 좋아요 ㅠㅠ"  # compatibility jamo stay as typed
    assert normalize("if x<5 and y>3 then") == "if x<5 and y>3 then"  # not a tag
    assert normalize("use &lt;br&gt; for breaks") == "use <br> for breaks"  # written markup stays text


def test_code_is_kept_as_written():
    block = "```python\ndef f(x):\n    return  x\n\n\nclass A:\n    pass\n```"
    assert normalize(f"Here  it is:\n{block}\nDone.") == f"Here it is:\n{block}\nDone."
    unclosed = "unclosed\n~~~\ncode  here\n\n\n  more  "  # a fence left open runs to the end
    assert normalize(unclosed) == unclosed
    assert normalize("Set `a  =  b` then") == "Set `a  =  b` then"
    assert normalize("def f():\n    if x:\n        return 1") == "def f():\n    if x:\n        return 1"
    assert normalize("List<String> and #include <vector>") == "List<String> and #include <vector>"  # not HTML
    assert normalize("<div class='x'>hi</div>   there <P>") == "hi there"


def test_measures():
    assert hangul_ratio("한국어 text") == pytest.approx(3 / 7)
    assert hangul_ratio("1234 !!") == 0.0
    assert repetition("a b c d e") == 0.0
    assert repetition("buy now buy now buy now buy now") == pytest.approx(1 - 2 / 6)


def _row(text):
    return {"messages": [{"role": "user", "content": "이야기를 들려주세요."}, {"role": "assistant", "content": text}]}


def test_filters_and_exact_dedup_with_a_report():
    rows = [_row(STORY), _row(STORY.replace(" ", "  ")),  # the same after normalisation
            _row("짧음"), _row("An English answer only, fairly long but with no Korean letters at all in it."),
            _row("좋아요 " * 30), {"text": STORY + " 그리고 끝."}]
    kept, report = clean_rows(rows, Filters(min_chars=30, min_hangul=0.5, max_repetition=0.3))
    assert report["read"] == 6 and report["kept"] == 2 == len(kept)
    assert {k: v["first"] for k, v in report["dropped"].items()} == {
        "exact_duplicate": [1], "too_short": [2], "too_little_hangul": [3], "repetitive": [4]}
    assert kept[0]["messages"][1]["content"] == normalize(STORY) and rows[1]["messages"][1]["content"] != kept[0]
    assert kept[1] == {"text": normalize(STORY + " 그리고 끝.")}


@pytest.mark.skipif(importlib.util.find_spec("datasketch") is None, reason="pip install datasketch")
def test_near_duplicates_are_found_by_minhash():
    near = STORY.replace("도시락을", "김밥을")  # one word changed in a long text
    other = "부산의 바다는 겨울에도 푸르다. 해운대 백사장을 걷다 보면 갈매기가 머리 위를 날고, 멀리 배들이 지나간다."
    kept, report = clean_rows([_row(STORY), _row(near), _row(other)], Filters(near_duplicates=0.7))
    assert report["dropped"] == {"near_duplicate": {"rows": 1, "first": [1]}} and len(kept) == 2


def test_the_data_command(tmp_path):
    rows = [_row(STORY), _row(STORY), _row("ok")]
    (tmp_path / "raw.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "data", "raw.jsonl", "clean/train.jsonl",
                           "--min-chars", "20"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 of 3 rows kept in clean/train.jsonl; dropped: 1 exact duplicate, 1 too short" in proc.stdout
    assert len((tmp_path / "clean" / "train.jsonl").read_text().splitlines()) == 1
    report = json.loads((tmp_path / "clean" / "train.jsonl.report.json").read_text())
    assert report["kept"] == 1 and report["dropped"]["too_short"]["first"] == [2]
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "data", "raw.jsonl", "raw.jsonl"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "is the file being cleaned" in proc.stderr
