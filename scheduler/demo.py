"""The quick-start demo: the platform's main job, end to end, through the stock ``openai`` SDK.

It starts the platform on embedded defaults, uploads a small dataset for a task the built-in base
model cannot do, fine-tunes it (with a progress display fed by the job's events), then asks the tuned
model and the base model the same held-out questions and prints both answers and the exact-match
rates. Nothing is canned: every number comes from the run.
"""

from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from scheduler.demo_data import DEMO_HYPERPARAMETERS, N_TEST, N_TRAIN, N_VALID, make_dataset
from scheduler.platform import Platform
from scheduler.settings import BUILTIN_BASE_MODEL, Settings
from scheduler.tenancy import generate_key

console = Console()


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(client: OpenAI, train: list[dict], valid: list[dict]):
    with tempfile.TemporaryDirectory() as tmp:
        train_file = client.files.create(file=_write_jsonl(train, Path(tmp) / "train.jsonl").open("rb"), purpose="fine-tune")
        valid_file = client.files.create(file=_write_jsonl(valid, Path(tmp) / "valid.jsonl").open("rb"), purpose="fine-tune")
    console.print(f"Uploaded {len(train)} training and {len(valid)} validation examples ({train_file.id}, {valid_file.id})")
    job = client.fine_tuning.jobs.create(
        model=BUILTIN_BASE_MODEL,
        training_file=train_file.id,
        validation_file=valid_file.id,
        suffix="demo",
        seed=42,
        method={"type": "supervised", "supervised": {"hyperparameters": DEMO_HYPERPARAMETERS}},
    )
    console.print(f"Created fine-tuning job {job.id}")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("queued", total=None, info="")
        while True:
            job = client.fine_tuning.jobs.retrieve(job.id)
            events = client.fine_tuning.jobs.list_events(job.id, limit=20).data
            metrics = next((e.data for e in events if e.type == "metrics" and e.data), None)
            if metrics:
                loss = metrics.get("train_loss")
                info = (f"loss {loss:.3f}" if loss is not None else "loss not finite") + (f"  valid {metrics['valid_loss']:.3f}" if metrics.get("valid_loss") is not None else "")
                progress.update(task, total=metrics["total_steps"], completed=metrics["step"], info=info)
            progress.update(task, description=job.status)
            if job.status in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1.0)


def _ask(client: OpenAI, model: str, messages: list[dict]) -> str:
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    return (reply.choices[0].message.content or "").strip()


def run_demo(settings: Settings, port: int = 8000) -> int:
    started = time.monotonic()
    key = settings.bootstrap_api_key or generate_key()
    settings.bootstrap_api_key = key
    train, valid, test = make_dataset(N_TRAIN, N_VALID, N_TEST, seed=7)
    console.print(f"Starting Tuneforge on embedded defaults (data in {settings.data_dir}) ...")
    with Platform(settings, port=port, log_dir=settings.data_dir / "logs") as platform:
        client = OpenAI(base_url=f"{platform.api_url}/v1", api_key=key, max_retries=0, timeout=120)
        t0 = time.monotonic()
        job = _train(client, train, valid)
        console.print(f"Job {job.status} in {time.monotonic() - t0:.0f}s")
        if job.status != "succeeded":
            console.print(f"[red]Job {job.status}: {job.error}[/red] (logs in {settings.data_dir / 'logs'})")
            return 1
        console.print(f"Fine-tuned model: [bold]{job.fine_tuned_model}[/bold] ({job.trained_tokens} trained tokens)")
        shown = 12
        table = Table(title=f"Held-out questions (first {shown} of {len(test)}): base vs tuned")
        for col in ("review", "expected", BUILTIN_BASE_MODEL, "tuned"):
            table.add_column(col, overflow="fold")
        hits = {"base": 0, "tuned": 0}
        # Concurrent requests: the engine batches them (and the two models) together.
        with ThreadPoolExecutor(max_workers=8) as pool:
            base_answers = list(pool.map(lambda r: _ask(client, BUILTIN_BASE_MODEL, r["messages"]), test))
            tuned_answers = list(pool.map(lambda r: _ask(client, job.fine_tuned_model, r["messages"]), test))
        for row, base, tuned in zip(test, base_answers, tuned_answers):
            expected = row["answer"]
            hits["base"] += base == expected
            hits["tuned"] += tuned == expected
            if table.row_count < shown:
                question = row["messages"][-1]["content"].splitlines()[0].removeprefix("Review: ")
                table.add_row(question, expected, base, tuned)
        console.print(table)
        n = len(test)
        console.print(f"Exact match on {n} held-out questions: base {hits['base']}/{n} = {hits['base'] / n:.0%}, tuned {hits['tuned']}/{n} = {hits['tuned'] / n:.0%}")
    console.print(f"Done in {time.monotonic() - started:.0f}s")
    return 0 if hits["tuned"] > hits["base"] else 1
