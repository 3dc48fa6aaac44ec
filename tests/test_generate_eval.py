"""eval.generate_every_n_steps in `trainer run`: metrics and sample predictions in metrics.jsonl and TensorBoard,
and the last evaluation (at the final step) scores exactly what `trainer predict` on the export scores."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.trainer import main as trainer_cli
from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows, records


def test_generation_eval_during_training_matches_predict_on_the_export(tmp_path):
    model = make_tokenizer_and_model(tmp_path)
    data = pack_rows(model, tmp_path / "data", n_records=64, seq_length=128)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in records(6, seed=5)))
    run_dir = tmp_path / "run"
    args = ["run", "--set", f"model.path={model}", "--set", f"data.train=[{data}]",
            "--set", f"logging.output_dir={run_dir}", "--set", "logging.progress_bar=false",
            "--set", "train.max_steps=8", "--set", "train.lr=3e-3", "--set", "data.micro_batch_size=2",
            "--set", "eval.generate_every_n_steps=4", "--set", f"eval.generate_data={dev}",
            "--set", "eval.generate_max_new_tokens=10", "--set", "eval.generate_samples=2",
            "--set", "logging.report_to=[tensorboard]", "--json"]
    res = CliRunner().invoke(trainer_cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    gen = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    gen = [r for r in gen if "gen_em" in r]
    assert [r["step"] for r in gen] == [4, 8]
    for r in gen:
        assert {"gen_em", "gen_bleu", "gen_rougeL", "gen_sample_0", "gen_sample_1"} <= set(r)
        assert "gen_sample_2" not in r and r["gen_sample_0"].startswith("id: r0\nprediction: ")
    assert summary["generation_eval"]["rougeL"] == gen[-1]["gen_rougeL"]
    assert list((run_dir / "tensorboard").glob("events.*"))

    out = tmp_path / "pred.jsonl"
    pred = CliRunner().invoke(trainer_cli, ["predict", "--model", str(run_dir / "export"), "--data", str(dev),
                                            "-o", str(out), "--max-new-tokens", "10", "--metrics",
                                            "em,bleu,rougeL", "--json"], catch_exceptions=False)
    assert pred.exit_code == 0, pred.output
    metrics = json.loads(pred.stdout)["metrics"]
    assert metrics == pytest.approx({k[4:]: gen[-1][k] for k in ("gen_em", "gen_bleu", "gen_rougeL")})
    # a run directory without checkpoints stands for its export
    res = CliRunner().invoke(trainer_cli, ["predict", "--model", str(run_dir), "--data", str(dev), "-o",
                                           str(tmp_path / "run.jsonl"), "--max-new-tokens", "10"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run.jsonl").read_text() == out.read_text()
    first = json.loads(out.read_text().splitlines()[0])
    assert gen[-1]["gen_sample_0"] == f"id: {first['id']}\nprediction: {first['prediction']}\nreference: {first['reference']}"


def test_generation_eval_needs_a_dev_set(tmp_path):
    res = CliRunner().invoke(trainer_cli, ["run", "--set", "model.path=x", "--set", "data.train=[y]",
                                           "--set", "eval.generate_every_n_steps=4"])
    assert res.exit_code == 2 and "eval.generate_data" in res.output


@pytest.mark.dist
@pytest.mark.slow
def test_generation_eval_under_two_fsdp_ranks_equals_predict_on_the_export(tmp_path, repo_root):
    """Under FSDP2 every rank generates (the root is unsharded for it); rank 0 logs what one process predicts."""
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_gloo_available():
        pytest.skip("torch was built without gloo")
    model = make_tokenizer_and_model(tmp_path)
    data = pack_rows(model, tmp_path / "data", n_records=64, seq_length=128)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in records(4, seed=5)))
    run_dir = tmp_path / "run"
    sets = [f"model.path={model}", f"data.train=[{data}]", f"logging.output_dir={run_dir}",
            "logging.progress_bar=false", "train.max_steps=4", "train.lr=3e-3", "data.micro_batch_size=1",
            "eval.generate_every_n_steps=4", f"eval.generate_data={dev}", "eval.generate_max_new_tokens=8",
            "eval.generate_samples=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "cli.trainer", "run", *[x for s in sets for x in ("--set", s)]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    gen = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "gen_em" in r]
    assert [r["step"] for r in gen] == [4]
    out = tmp_path / "pred.jsonl"
    res = CliRunner().invoke(trainer_cli, ["predict", "--model", str(run_dir / "export"), "--data", str(dev),
                                           "-o", str(out), "--max-new-tokens", "8"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for i, row in enumerate(map(json.loads, out.read_text().splitlines())):
        assert gen[0][f"gen_sample_{i}"] == f"id: {row['id']}\nprediction: {row['prediction']}\nreference: {row['reference']}"
