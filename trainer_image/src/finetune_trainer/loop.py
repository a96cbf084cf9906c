"""The task-agnostic training loop: data order, state, preemption, checkpoints, evaluation and the finish.

One :class:`Trainer` per worker process (one per GPU or CPU rank). What depends on the task (processor, data
preparation, model, collation, forward and loss, metrics, samples, export) is asked of the task object from
the registry (finetune_trainer.tasks.TASKS, protocol in finetune_trainer.tasks.base); the loop only moves
examples, steps, signals and checkpoints. The worker entry (finetune_trainer.train) turns its outcome into
an exit code.
"""

from __future__ import annotations

import logging
import math
import signal
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from finetune_trainer.checkpoint import Checkpoint, CheckpointManager, complete_checkpoints
from finetune_trainer.config import ConfigError, EarlyStoppingMetric, TrainerConfig
from finetune_trainer.data.errors import DataError
from finetune_trainer.data_order import DataOrder
from finetune_trainer.distributed import Distributed, seed_everything, set_rng_state
from finetune_trainer.engine import (
    DeepSpeedEngine,
    Engine,
    TorchEngine,
    deepspeed_config,
    evaluating,
    uses_deepspeed,
)
from finetune_trainer.env import TorchrunEnv
from finetune_trainer.evaluation import evaluate
from finetune_trainer.exit_codes import ExitCode
from finetune_trainer.export import export_outputs
from finetune_trainer.modeling import check_cuda_requirements, count_parameters
from finetune_trainer.reporting import Reporter
from finetune_trainer.state import TrainState, improved
from finetune_trainer.status import Pace, checkpoints_status, progress_status
from finetune_trainer.tasks import make_task
from finetune_trainer.tasks.base import TrainingTask

log = logging.getLogger("finetune_trainer")


class PreemptionFlag:
    """SIGTERM sets a flag; the loop agrees on it across ranks at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


class Trainer:
    def __init__(self, cfg: TrainerConfig, env: TorchrunEnv):
        self.cfg = cfg
        self.env = env
        self.preemption = PreemptionFlag()
        self.dist = Distributed(env, use_deepspeed=uses_deepspeed(cfg, env))
        self.output_dir = Path(cfg.output.dir)
        self.reporter = Reporter(cfg.reporting, self.output_dir, enabled=self.dist.is_main)
        self.started = time.monotonic()
        self.resumed_step = 0
        self.order = DataOrder(0, 1, 1, 1, cfg.seed)
        self.task: TrainingTask = make_task(cfg)

    # ------------------------------------------------------------------------------------------ set-up
    def _prepare_data(self, processor: Any) -> Any:
        # Rank 0 prepares into the cache on the job's volume, next to the checkpoints (a restarted attempt
        # with the same data reuses it) and writes the report next to the outputs; the other ranks wait for
        # it and memory-map the result (docs/data-preparation.md).
        attempt = self.dist.broadcast(uuid.uuid4().hex)
        store = Path(self.cfg.checkpointing.dir).parent / "data-cache"
        with tempfile.TemporaryDirectory() as scratch:
            workdir = self.output_dir if self.dist.is_main else Path(scratch)
            return self.task.prepare(
                processor, workdir, store=store, attempt=attempt, wait=not self.dist.is_main
            )

    def _train_examples(self, indices: list[int]) -> list[Any]:
        """The prepared training examples at ``indices`` (in that order)."""
        return [self.data.train[i] for i in indices]

    def _status(self, stage: str, state: TrainState, **metrics: Any) -> None:
        pace = Pace(
            step=state.step,
            total_steps=state.total_steps,
            steps_per_epoch=self.order.steps_per_epoch,
            steps_done=state.step - self.resumed_step,
            elapsed_seconds=time.monotonic() - self.started,
        )
        self.reporter.status(progress_status(stage, pace, **metrics))

    def run(self) -> ExitCode:
        cfg = self.cfg
        check_cuda_requirements(cfg)
        # The operator's rendered DeepSpeed JSON is checked against this world size before any work.
        ds_config = deepspeed_config(cfg, self.dist.world_size) if uses_deepspeed(cfg, self.env) else None
        seed_everything(cfg.seed)
        processor = self.task.load_processor()
        state = TrainState(world_size=self.dist.world_size)
        self._status("Preparing", state)
        data = self._prepare_data(processor)
        self.data = data
        hp = cfg.hyperparameters
        self.order = DataOrder(
            len(data.train),
            hp.micro_batch_size,
            hp.gradient_accumulation_steps,
            self.dist.world_size,
            cfg.seed,
        )
        if self.order.steps_per_epoch == 0:
            raise DataError(
                f"the train split has {len(data.train)} examples, fewer than one global batch "
                f"({self.order.global_batch} = microBatchSize x gradientAccumulationSteps x "
                f"{self.dist.world_size} ranks)",
                reason="TrainSplitTooSmall",
            )
        state.total_steps = hp.max_steps or hp.epochs * self.order.steps_per_epoch
        state.data_fingerprint = self.task.fingerprint(data.train)

        model = self.task.load_model(data, self.dist.device, ds_config)
        trainable, total = count_parameters(model)
        engine: Engine
        if ds_config is not None:
            engine = DeepSpeedEngine(cfg, model, self.env, state.total_steps, ds_config, self.task)
        else:
            engine = TorchEngine(cfg, model, self.dist.device, state.total_steps, self.task)
        self.engine = engine
        self.checkpoints = CheckpointManager(
            Path(cfg.checkpointing.dir), self.dist, keep_last=cfg.checkpointing.keep_last
        )
        self.reporter.event(
            "start",
            trainable_params=trainable,
            total_params=total,
            world_size=self.dist.world_size,
            total_steps=state.total_steps,
            steps_per_epoch=self.order.steps_per_epoch,
        )

        resume = self.checkpoints.latest()
        if resume is not None:
            state = self._resume(resume, state)
        elif cfg.evaluation.before_training:
            self._status("Evaluating", state)
            state.before = {
                "validation": self._evaluate(data.validation),
                "test": self._evaluate(data.test),
            }
            self.reporter.event("eval", step=0, split="before", **_flat(state.before))
            self._status("Evaluating", state, before=state.before["validation"])
        self.resumed_step = state.step
        self.started = time.monotonic()
        outcome = self._train(state)
        if outcome is ExitCode.PREEMPTED:
            return outcome
        self._finish(state)
        return ExitCode.SUCCESS

    def _evaluate(self, examples: Sequence[Any]) -> dict[str, float]:
        ev = self.cfg.evaluation
        if ev.max_samples is not None:
            examples = examples[: ev.max_samples]
        return evaluate(
            self.engine,
            self.task,
            examples,
            self.dist,
            batch_size=ev.batch_size,
            max_batches=ev.max_batches,
        )

    def _resume(self, ckpt: Checkpoint, fresh: TrainState) -> TrainState:
        state = TrainState.from_json(ckpt.read_state())
        if state.world_size != self.dist.world_size and uses_deepspeed(self.cfg, self.env):
            raise ConfigError(
                f"checkpoint {ckpt.path} was written by {state.world_size} ranks, this run has "
                f"{self.dist.world_size}; ZeRO checkpoints cannot change world size"
            )
        if state.data_fingerprint != fresh.data_fingerprint:
            log.warning("the train split changed since %s; the data position is approximate", ckpt.path)
        state.total_steps, state.world_size = fresh.total_steps, fresh.world_size
        state.data_fingerprint = fresh.data_fingerprint
        self.engine.load(_engine_dir(ckpt))
        rng = ckpt.load_rng(self.dist.rank)
        if rng is not None:
            set_rng_state(rng)
        log.info("resumed from %s at step %d", ckpt.path, state.step)
        self.reporter.event("resume", step=state.step, checkpoint=str(ckpt.path))
        return state

    # ------------------------------------------------------------------------------------------ the loop
    def _save(self, state: TrainState) -> Checkpoint:
        self._status("Saving", state)
        engine_dir_name = "engine" if isinstance(self.engine, DeepSpeedEngine) else ""

        def write(tmp: Path) -> None:
            target = tmp / engine_dir_name if engine_dir_name else tmp
            target.mkdir(exist_ok=True)
            self.engine.save(target)

        ckpt = self.checkpoints.save(state.step, write, state.to_json())
        keep = {state.best_step} if state.best_step is not None else set()
        self.checkpoints.prune(keep_steps=keep)
        self.reporter.event("checkpoint", step=state.step, path=str(ckpt.path))
        if self.dist.is_main:
            best = self.checkpoints.find(state.best_step) if state.best_step is not None else None
            self.reporter.status(
                checkpoints_status(
                    str(ckpt.path),
                    state.step,
                    str(best.path) if best else None,
                    len(complete_checkpoints(self.checkpoints.root)),
                )
            )
        return ckpt

    def _train(self, state: TrainState) -> ExitCode:
        cfg, order, engine = self.cfg, self.order, self.engine
        every_eval = cfg.evaluation.every_steps
        every_ckpt = cfg.checkpointing.every_steps
        log_every = cfg.reporting.log_every_steps
        saved_step = state.step
        perm_epoch, perm = -1, []
        window_loss, window_samples, window_units = torch.zeros((), device=self.dist.device), 0, 0
        window_steps, window_start = 0, time.perf_counter()
        engine.train(True)
        while state.step < state.total_steps and not state.stopped_early:
            epoch, in_epoch = divmod(state.step, order.steps_per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, order.permutation(epoch)
                # Tasks whose examples change per epoch (recommendation's negatives) are told which one.
                set_epoch = getattr(self.task, "set_epoch", None)
                if set_epoch is not None:
                    set_epoch(epoch)
            step_start = time.perf_counter()
            for indices in order.micro_batches(perm, in_epoch, self.dist.rank):
                examples = self._train_examples(indices)
                batch = self.task.collate(examples, self.dist.device)
                window_loss = window_loss + engine.train_micro_batch(batch).float()
                window_samples += len(examples)
                window_units += self.task.units(examples)
            grad_norm = engine.optimizer_step()
            state.step += 1
            window_steps += 1
            step_seconds = time.perf_counter() - step_start
            epoch_end = state.step % order.steps_per_epoch == 0

            if state.step % log_every == 0 or state.step == state.total_steps:
                self._log_train(
                    state,
                    window_loss,
                    window_steps,
                    window_samples,
                    window_units,
                    time.perf_counter() - window_start,
                    step_seconds,
                    grad_norm,
                )
                window_loss, window_samples, window_units = torch.zeros((), device=self.dist.device), 0, 0
                window_steps, window_start = 0, time.perf_counter()

            new_best = False
            last = state.step == state.total_steps
            if (every_eval and (state.step % every_eval == 0 or last)) or (
                cfg.evaluation.every_epoch and (epoch_end or last)
            ):
                new_best = self._eval_step(state)
            preempt = self.dist.any_true(self.preemption.requested)
            due = (
                (every_ckpt and state.step % every_ckpt == 0)
                or (cfg.checkpointing.save_on_epoch_end and epoch_end)
                or new_best
                or preempt
                or state.stopped_early
            )
            if due and saved_step != state.step:
                self._save(state)
                saved_step = state.step
            if preempt:
                log.warning("SIGTERM: checkpoint saved at step %d, exiting for a restart", state.step)
                self.reporter.event("preempted", step=state.step)
                self._status("Saving", state)
                return ExitCode.PREEMPTED
            if state.stopped_early:
                log.info("early stopping at step %d (best step %s)", state.step, state.best_step)
                break
        if saved_step != state.step:
            self._save(state)
        return ExitCode.SUCCESS

    def _log_train(
        self,
        state: TrainState,
        loss_sum: torch.Tensor,
        steps: int,
        samples: int,
        units: int,
        seconds: float,
        step_seconds: float,
        grad_norm: float | None,
    ) -> None:
        micro = steps * self.cfg.hyperparameters.gradient_accumulation_steps
        loss, samples_f, units_f = self.dist.sum([float(loss_sum) / micro, float(samples), float(units)])
        loss /= self.dist.world_size
        lr = self.engine.learning_rate()
        samples_ps, units_ps = samples_f / seconds, units_f / seconds
        per_second = f"{self.task.unit}_per_second"
        entry = {"step": state.step, "train_loss": loss, "lr": lr}
        state.history.append(entry)
        if not self.dist.is_main:
            return
        gpu_mem = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        self.reporter.event(
            "train",
            step=state.step,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            samples_per_second=samples_ps,
            **{per_second: units_ps},
            step_seconds=step_seconds,
            gpu_memory_bytes=gpu_mem,
        )
        self.reporter.gauges(
            {
                "loss": loss,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "samples_per_second": samples_ps,
                per_second: units_ps,
                "step_seconds": step_seconds,
                "step": float(state.step),
                "progress_ratio": state.step / max(1, state.total_steps),
                "gpu_memory_bytes": gpu_mem,
            }
        )
        # status.progress has a throughput field for tokens only (FineTuneJob's Progress); other units are in
        # the metrics log and the gauges.
        throughput = {"tokensPerSecond": round(units_ps, 1)} if self.task.unit == "tokens" else {}
        self._status(
            "Training",
            state,
            trainLoss=loss,
            learningRate=lr,
            samplesPerSecond=round(samples_ps, 3),
            **throughput,
        )

    def _eval_step(self, state: TrainState) -> bool:
        cfg = self.cfg
        self._status("Evaluating", state)
        metrics = self._evaluate(self.data.validation)
        if not metrics:
            return False
        es = cfg.early_stopping
        key = es.metric.value if es.enabled else EarlyStoppingMetric.LOSS.value
        if key not in metrics:
            raise ConfigError(
                f"earlyStopping.metric {key!r}: task {self.task.name} computed {', '.join(sorted(metrics))}"
            )
        value = metrics[key]
        state.best_eval_loss = min(metrics["loss"], state.best_eval_loss or math.inf)
        new_best = (
            improved(cfg, value, state.best_metric)
            if es.enabled
            else (state.best_metric is None or value < state.best_metric)
        )
        if new_best:
            state.best_metric, state.best_step = value, state.step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
            if es.enabled and state.evals_without_improvement >= es.patience:
                state.stopped_early = True
        state.history.append({"step": state.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        self.reporter.event("eval", step=state.step, split="validation", **metrics, best_step=state.best_step)
        self.reporter.gauges({"eval_loss": metrics["loss"]})
        # status.metrics names loss and perplexity (FineTuneJob's Metrics); the task's others go to extra.
        named = {"perplexity": metrics["perplexity"]} if "perplexity" in metrics else {}
        self._status(
            "Training",
            state,
            evalLoss=metrics["loss"],
            **named,
            bestEvalLoss=state.best_eval_loss,
            bestStep=state.best_step,
            extra={k: v for k, v in metrics.items() if k not in ("loss", "perplexity")},
        )
        return new_best

    # ------------------------------------------------------------------------------------------- finish
    def _finish(self, state: TrainState) -> None:
        if state.best_step is not None and state.best_step != state.step:
            best = self.checkpoints.find(state.best_step)
            if best is not None:
                log.info("exporting the best checkpoint (step %d)", best.step)
                self.engine.load(_engine_dir(best))
        self._status("Evaluating", state)
        after = {"validation": self._evaluate(self.data.validation), "test": self._evaluate(self.data.test)}
        self.reporter.event("eval", step=state.step, split="after", **_flat(after))
        samples = self._samples()
        if samples:
            self.reporter.event("samples", count=len(samples))
        self._status("Saving", state)
        artifact = export_outputs(
            self.cfg, self.engine, self.dist, self.task, self.data, state, after, samples
        )
        if artifact is not None:
            if self.cfg.output.copy_to:
                self._copy_outputs(artifact)
            self.reporter.status({"artifact": artifact})
        # The last report: the outputs are written, so the run is complete (not still `Saving`).
        self._status(
            "Completed",
            state,
            after=after["test"] or after["validation"],
            before=state.before.get("validation", {}),
        )
        self.reporter.event("done", step=state.step, best_step=state.best_step, **_flat(after))

    def _samples(self) -> list[dict[str, Any]]:
        """The task's predictions on a few validation rows (every rank runs them: ZeRO-3 needs it)."""
        synced = (
            isinstance(self.engine, DeepSpeedEngine)
            and self.cfg.distributed.zero_stage == 3
            and self.dist.world_size > 1
        )
        with evaluating(self.engine):
            return self.task.samples(self.engine.module, self.data, self.dist.device, synced)

    def _copy_outputs(self, artifact: dict[str, Any]) -> None:
        """Rank 0, after the export: copy output.dir to output.copyTo (spec.output.uri). Raises
        OutputCopyError (exit RETRYABLE) on failure; the artifact is reported only once the copy is whole."""
        from finetune_trainer.output_copy import copy_outputs

        out = self.cfg.output
        assert out.copy_to is not None
        address = out.copy_address
        self.reporter.event("copy", destination=address)
        result = copy_outputs(
            self.output_dir,
            out.copy_to,
            address=address,
            attempts=out.copy_attempts,
            extra_marker={"artifact": artifact},
        )
        self.reporter.event("copied", destination=address, files=result.files, bytes=result.bytes)

    def close(self) -> None:
        self.reporter.close()
        self.dist.close()


def _engine_dir(ckpt: Checkpoint) -> Path:
    return ckpt.path / "engine" if (ckpt.path / "engine").is_dir() else ckpt.path


def _flat(nested: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{split}_{k}": v for split, values in nested.items() for k, v in values.items()}
