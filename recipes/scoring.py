"""Scoring after prediction (recipe=evaluate): once every rank has written its predictions, global rank 0 merges them
in benchmark order, scores them by the benchmark's family (caption: per-source event recall/precision with the exact
toy-world judge or AutoDQ; multiple choice; Video-MME) and writes the results: a table printed, a JSON summary,
per-sample jsonl, a PNG chart, and the same to the loggers (W&B: a table of examples and a per-source chart)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from recipes.evaluate import STATS_FILE
from recipes.writers import JsonlWriter
from tarsier_train.checkpoint.atomic import write_text_atomically
from tarsier_train.config.types import NonNegativeInt, PositiveInt
from tarsier_train.eval.benchmark_records import prediction_text, reference_text
from tarsier_train.eval.benchmarks import Benchmark
from tarsier_train.eval.captions import CaptionScorer
from tarsier_train.eval.multiple_choice import MultipleChoiceScorer
from tarsier_train.eval.plots import grouped_bar_chart
from tarsier_train.eval.results import BenchmarkResult, Scorer
from tarsier_train.sampler.judges import Judge

log = logging.getLogger("tarsier_train")


class BenchmarkScoring(L.Callback):
    output_label = "results"  # train.py prints where each output went

    def __init__(self, output_dir: str, judge: Judge | None = None, max_concurrency: PositiveInt = 8,
                 num_logged_examples: NonNegativeInt = 16):
        self.output_dir, self.judge = Path(output_dir), judge
        self.max_concurrency, self.num_logged_examples = max_concurrency, num_logged_examples

    def scorer(self, benchmark: Benchmark) -> Scorer:
        if benchmark.scoring == "caption":
            if self.judge is None:
                raise ValueError(f"benchmark {benchmark.name} scores descriptions: set judge=exact (toy world) or "
                                 "judge=autodq judge.base_url=... judge.model=...")
            return CaptionScorer(self.judge, max_concurrency=self.max_concurrency)
        return MultipleChoiceScorer(rule="videomme" if benchmark.scoring == "videomme" else "tarsier")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()  # every rank's predictions are committed (the writer's on_predict_end ran)
        if trainer.is_global_zero:  # alone, with no collective after it: judging may take longer than a timeout
            self.score(trainer)

    def results_dir(self, benchmark: Benchmark) -> Path:
        """One folder per way of scoring, so that scoring the same predictions with another judge keeps both."""
        if benchmark.scoring != "caption":
            return self.output_dir / benchmark.scoring
        model = getattr(self.judge, "model", None)
        return self.output_dir / ("exact" if model is None else "autodq-" + re.sub(r"[^A-Za-z0-9._-]+", "_", model))

    def score(self, trainer: L.Trainer) -> BenchmarkResult:
        benchmark: Benchmark = trainer.datamodule.benchmark
        writer = next(c for c in trainer.callbacks if isinstance(c, JsonlWriter))
        predicted = merged_predictions(writer.committed_files())
        order = [key for key, _ in benchmark.records()] if benchmark.annotations else sorted(predicted)
        records = [predicted[key] for key in order if key in predicted]
        missing = [key for key in order if key not in predicted]
        results = self.results_dir(benchmark)
        results.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.output_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        result = self.scorer(benchmark).score(records)
        skipped = skip_reasons(Path(trainer.default_root_dir))
        summary = {"benchmark": benchmark.name, "scoring": benchmark.scoring, "num_records": len(order),
                   "num_predicted": len(records), "missing": {"count": len(missing), "keys": missing,
                                                              "reasons": skipped}, **result.summary}
        write_text_atomically(results / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        write_text_atomically(results / "per_sample.jsonl",
                              "".join(json.dumps(row, sort_keys=True) + "\n" for row in result.per_sample))
        write_text_atomically(results / "table.txt", result.table + "\n")
        grouped_bar_chart(result.chart, f"{benchmark.name} ({benchmark.scoring})",
                                  results / f"{benchmark.name}.png")
        note = f"\n{len(missing)} of {len(order)} records have no prediction ({skipped}): a rerun tries them again" \
            if missing else ""
        print(f"\n{benchmark.name}: {len(records)} records scored\n{result.table}{note}\nresults: {results}\n",
              flush=True)
        self.log_result(trainer, f"{benchmark.name}/{results.name}", result, records)
        return result

    def log_result(self, trainer: L.Trainer, name: str, result: BenchmarkResult, records: list[dict[str, Any]]
                   ) -> None:
        """Every charted figure as a metric eval/<benchmark>/<scoring>/<series>/<group>; on W&B also a table of
        examples and a bar chart."""
        metrics = {f"eval/{name}/{series}/{group}": float(value)
                   for series, values in result.chart.items() for group, value in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics)
            if isinstance(logger, WandbLogger):
                import wandb

                rows = [[row.get("key"), prediction_text(record), reference_text(record),
                         json.dumps({k: v for k, v in row.items() if k not in ("key",)}, sort_keys=True)[:2000]]
                        for row, record in zip(result.per_sample[:self.num_logged_examples], records)]
                logger.log_table(f"eval/{name}/examples", ["key", "prediction", "reference", "scores"],
                                 rows)
                groups = list(next(iter(result.chart.values()), {}))
                table = wandb.Table(columns=["group", *result.chart],
                                    data=[[g, *(result.chart[s].get(g) for s in result.chart)] for g in groups])
                last = list(result.chart)[-1]
                logger.experiment.log({f"eval/{name}/chart": wandb.plot.bar(
                    table, "group", last, title=f"{name}: {last} per group")})


def merged_predictions(files: list[Path]) -> dict[str, dict[str, Any]]:
    """key -> predicted record over every committed file (a record written twice, by padding ranks or an earlier
    run, counts once)."""
    predicted: dict[str, dict[str, Any]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                predicted.setdefault(record["key"], record)
    return predicted


def skip_reasons(run_dir: Path) -> dict[str, int]:
    """Why records could not be predicted, summed over the ranks of the last run."""
    reasons: dict[str, int] = {}
    for path in sorted(run_dir.glob(STATS_FILE.format(rank="*"))):
        for reason, count in json.loads(path.read_text()).get("skipped", {}).items():
            reasons[reason] = reasons.get(reason, 0) + count
    return dict(sorted(reasons.items()))
