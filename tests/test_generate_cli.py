"""`trainer generate` and `trainer predict` as a user runs them: outputs, summaries, errors, interruption, metrics."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.trainer import main as trainer_cli
from tests.helpers.tiny_run import make_tokenizer_and_model
from trainer import text_metrics


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tokenizer_and_model(tmp_path_factory.mktemp("gen_cli"))


def _run(args, input=None):
    return CliRunner().invoke(trainer_cli, [str(a) for a in args], input=input, catch_exceptions=False)


def _records(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "Repeat: red cat"}, {"role": "assistant", "content": "red cat"}]},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Repeat: one"},
                             {"role": "assistant", "content": "one"}]},
    {"id": "c", "messages": [{"role": "user", "content": "Repeat: sun moon star dog bird"},
                             {"role": "assistant", "content": "sun moon star dog bird"}]},
]


def test_generate_prompt_json_and_messages_file(model_dir, tmp_path):
    res = _run(["generate", "--model", model_dir, "--prompt", "Repeat: red cat", "--max-new-tokens", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["tokens"] <= 5 and out["stop_reason"] in ("stop", "length") and out["template"] == "chatml"
    assert out["kind"] == "hf" and out["prompt_tokens"] > 3
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps(ROWS[0]))  # a whole record: its final assistant turn is dropped
    res2 = _run(["generate", "--model", model_dir, "--messages", msgs, "--max-new-tokens", "5", "--json"])
    assert json.loads(res2.stdout)["prediction"] == out["prediction"]
    res3 = _run(["generate", "--model", model_dir, "--messages", msgs, "--max-new-tokens", "5"])
    assert res3.exit_code == 0 and out["prediction"] in res3.stdout


def test_generate_interactive_keeps_history(model_dir):
    turns = "Repeat: one\nRepeat: two\n/reset\nRepeat: two\n\n/exit\nRepeat: never read\n"
    res = _run(["generate", "--model", model_dir, "--max-new-tokens", "4", "--json"], input=turns)
    assert res.exit_code == 0, res.output
    answers = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(answers) == 3
    first, second, after_reset = (a["prompt_tokens"] for a in answers)
    assert second > first + answers[0]["tokens"]  # the first exchange is part of the second prompt
    alone = json.loads(_run(["generate", "--model", model_dir, "--prompt", "Repeat: two", "--max-new-tokens", "4",
                             "--json"]).stdout)
    assert after_reset == alone["prompt_tokens"] and answers[2]["prediction"] == alone["prediction"]  # history cleared


def test_generate_sampling_is_seeded(model_dir):
    args = ["generate", "--model", model_dir, "--prompt", "Repeat: blue", "--max-new-tokens", "8", "--json",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95", "--repetition-penalty", "1.1"]
    a = json.loads(_run([*args, "--seed", "1"]).stdout)["prediction"]
    assert a == json.loads(_run([*args, "--seed", "1"]).stdout)["prediction"]


def test_predict_writes_rows_in_input_order_with_metrics(model_dir, tmp_path):
    data = _records(tmp_path / "dev.jsonl", ROWS)
    out = tmp_path / "pred.jsonl"
    res = _run(["predict", "--model", model_dir, "--data", data, "-o", out, "--max-new-tokens", "6",
                "--batch-size", "2", "--metrics", "em,bleu,rougeL", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert set(rows[0]) == {"id", "messages", "reference", "prediction", "tokens", "stop_reason"}
    assert rows[1]["messages"][0] == {"role": "system", "content": "Be brief."} and rows[1]["reference"] == "one"
    assert summary["records"] == 3 and summary["batches"] == 2 and set(summary["metrics"]) == {"em", "bleu", "rougeL"}
    want = text_metrics.score([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert summary["metrics"] == pytest.approx(want)
    again = _run(["predict", "--model", model_dir, "--data", data, "-o", out])
    assert again.exit_code == 1 and "already exists" in again.output
    # also reads what convert reads: Alpaca JSON
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Repeat: red", "input": "", "output": "red"}]))
    res = _run(["predict", "--model", model_dir, "--data", alpaca, "-o", tmp_path / "a.jsonl", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a.jsonl").read_text())["reference"] == "red"


def test_predict_bad_input_names_file_and_line(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"id": "x", "messages": [{"role": "user"}]}\n')
    out = tmp_path / "out.jsonl"
    res = _run(["predict", "--model", model_dir, "--data", bad, "-o", out])
    assert res.exit_code == 1
    assert f"{bad}:2" in res.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    res = _run(["predict", "--model", model_dir, "--data", bad, "-o", out, "--metrics", "em,nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = _run(["predict", "--model", tmp_path, "--data", bad, "-o", out])
    assert res.exit_code == 1 and "error:" in res.output


def test_interrupted_predict_leaves_nothing_that_looks_complete(model_dir, tmp_path, monkeypatch):
    import trainer.generate as gen

    data = _records(tmp_path / "dev.jsonl", ROWS)
    real = gen.generate
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", flaky)
    out = tmp_path / "pred.jsonl"
    res = CliRunner().invoke(trainer_cli, ["predict", "--model", str(model_dir), "--data", str(data), "-o", str(out),
                                           "--batch-size", "1", "--max-new-tokens", "3"])
    assert res.exit_code != 0 and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.jsonl"]


def test_text_metrics_tokenize_chinese_per_character():
    assert text_metrics.tokenize("宽松的阔腿裤, Very nice!") == ["宽", "松", "的", "阔", "腿", "裤", "very", "nice"]
    s = text_metrics.score(["一条红色的裙子。", "The cat sat."], ["一条红色的裙子。", "The cat sat on the mat."])
    assert s["em"] == 0.5 and 0 < s["bleu"] < 100 and 0.5 < s["rougeL"] < 1
    zh = text_metrics.score(["一条红色的裙子"], ["一条蓝色的裙子"], ["rougeL"])
    assert zh["rougeL"] == pytest.approx(6 / 7)  # LCS of 6 of 7 characters, F1 = 6/7
    with pytest.raises(ValueError, match="unknown metric"):
        text_metrics.parse_metrics("em,bleu4")
    assert text_metrics.parse_metrics("EM, rougel") == ["em", "rougeL"]
