"""Airflow DAG: convert -> pack N partitions in parallel (dynamic task mapping) -> merge -> verify -> train.

Every step is one sftkit CLI call in a BashOperator, so the Airflow environment needs no sftkit (nor torch):
the commands run from `params.sftkit_bin`, the bin directory of the environment where sftkit is installed
(empty: found on PATH). Every path is a DAG param; trigger with a conf to point it at your data, e.g.

    airflow dags trigger sft_pipeline -c '{"inputs": ["/data/alpaca.json"], "work_dir": "/scratch/sft",
        "model": "/models/Qwen2.5-0.5B-Instruct", "seq_length": 4096, "partitions": 8}'

Why it is safe to retry any task: `convert --overwrite` rewrites its file atomically; `pack` and `merge`
reuse an existing output made from the same inputs and options (content hashes in the manifest) and refuse
a different one; `trainer run` resumes from its newest complete checkpoint (`--resume auto`). Exit codes
are 0 ok, 1 data/run failure, 2 usage error, 3 trainer stopped after saving a checkpoint (retry resumes).
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param, get_current_context, task

# "<bin>/" when params.sftkit_bin is set, else "" (commands found on PATH).
BIN = "{{ (params.sftkit_bin ~ '/') if params.sftkit_bin else '' }}"
WORK = "{{ params.work_dir }}"
CONVERSATIONS = f"{WORK}/conversations.jsonl"
MERGED = f"{WORK}/data"

with DAG(
    dag_id="sft_pipeline",
    description="SFT data prep (convert, partitioned pack, merge, verify) and fine-tuning with sftkit",
    schedule=None,
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,
    max_active_tasks=8,
    default_args={"retries": 0},
    tags=["sftkit"],
    params={
        "inputs": Param(
            ["examples/data/alpaca_example.json", "examples/data/src_tgt_example.jsonl"],
            type="array",
            description="Input files or quoted globs (Alpaca, src/tgt, ShareGPT, messages; .gz/.zst). "
            "Relative paths are resolved against repo_dir. No spaces in paths.",
        ),
        "repo_dir": Param(".", type="string", description="Working directory of every command."),
        "work_dir": Param("airflow_out", type="string", description="Where conversations, parts, data, run go."),
        "sftkit_bin": Param("", type="string", description="bin directory holding dataprep/trainer; empty: PATH."),
        "model": Param("", type="string", description="Hugging Face checkpoint directory to fine-tune."),
        "tokenizer": Param("", type="string", description="Tokenizer directory; empty: the model's own."),
        "seq_length": Param(256, type="integer", minimum=2),
        "partitions": Param(3, type="integer", minimum=1, description="Parallel pack tasks."),
        "partition_by": Param("record", enum=["record", "file"]),
        "train_config": Param("", type="string", description="trainer YAML config; empty: defaults + the sets below."),
        "max_steps": Param(20, type="integer", minimum=1),
        "nproc_per_node": Param(1, type="integer", minimum=1,
                                description="Training processes on the worker (GPUs); > 1 runs trainer under torchrun."),
        "train_sets": Param(
            ["data.micro_batch_size=2", "train.lr=3e-3", "checkpoint.export=false"],
            type="array",
            description="Extra `trainer run --set KEY=VALUE` overrides.",
        ),
    },
) as dag:
    convert = BashOperator(
        task_id="convert",
        cwd="{{ params.repo_dir }}",
        bash_command=(
            f"mkdir -p {WORK} && {BIN}dataprep convert {{{{ params.inputs | join(' ') }}}} "
            f"-o {CONVERSATIONS} --overwrite --json"
        ),
        do_xcom_push=False,
    )

    @task
    def partition_envs() -> list[dict[str, str]]:
        """One environment per pack task: which partition, and its output directory."""
        params = get_current_context()["params"]
        n = int(params["partitions"])
        return [{"PARTITION": f"{i}/{n}", "PART_DIR": f"{params['work_dir']}/parts/p{i}"} for i in range(n)]

    pack = BashOperator.partial(
        task_id="pack_partition",
        cwd="{{ params.repo_dir }}",
        bash_command=(
            f"{BIN}dataprep pack {CONVERSATIONS} -o \"$PART_DIR\" "
            "--tokenizer {{ params.tokenizer or params.model }} --seq-length {{ params.seq_length }} "
            "--partition \"$PARTITION\" --partition-by {{ params.partition_by }} --json -v"
        ),
        append_env=True,
        do_xcom_push=False,
    ).expand(env=partition_envs())

    merge = BashOperator(
        task_id="merge",
        cwd="{{ params.repo_dir }}",
        bash_command=(
            f"{BIN}dataprep merge "
            f"{{% for i in range(params.partitions) %}}{WORK}/parts/p{{{{ i }}}} {{% endfor %}}"
            f"-o {MERGED} --json"
        ),
        do_xcom_push=False,
    )

    verify = BashOperator(
        task_id="verify",
        cwd="{{ params.repo_dir }}",
        bash_command=f"{BIN}dataprep verify {MERGED} --json",
        do_xcom_push=False,
    )

    train = BashOperator(
        task_id="train",
        cwd="{{ params.repo_dir }}",
        bash_command=(
            "{% if params.nproc_per_node > 1 %}"
            f"{BIN}torchrun --standalone --nproc-per-node {{{{ params.nproc_per_node }}}} -m cli.trainer run "
            "{% else %}"
            f"{BIN}trainer run "
            "{% endif %}"
            "{{ ('--config ' ~ params.train_config) if params.train_config else '' }} "
            "--set model.path={{ params.model }} "
            f"--set 'data.train=[{MERGED}]' --set logging.output_dir={WORK}/run "
            "--set train.max_steps={{ params.max_steps }} "
            "{% for s in params.train_sets %}--set '{{ s }}' {% endfor %}--json"
        ),
        do_xcom_push=False,
    )

    convert >> pack >> merge >> verify >> train
