"""After a restart (a crash included), every acknowledged request completes or fails clearly,
and every training run continues exactly where its last request left it.

A run's state on disk (engine/run_state.py) includes its ops up to some seq_id; the request
log (the futures table) holds every request after it. `recover` queues those requests again,
in seq_id order, before the server takes new ones: requests that had completed run only for
their effect on the run, pending ones complete their futures, failed or rejected ones are
skipped. The state is written every `state_every` optim steps, which bounds the replay.

Pending sample requests are queued once the runs they may sample from (ephemeral sampler
snapshots are rebuilt by the replay) have been replayed. Anything else that was pending fails
with a clear error.
"""

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinkerd.api.service import Service
from tinkerd.store.records import FutureRecord

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    runs: int = 0  # runs replayed
    replayed: int = 0  # requests queued again
    failed: int = 0  # pending requests that could not be re-run
    samples: list[FutureRecord] = field(default_factory=list)  # pending, queued after the runs
    waits: list[tuple[str, str, int]] = field(default_factory=list)  # (base, model_id, seq_id)
    # (base, model_id, seq_ids queued again): for the progress lines
    plan: list[tuple[str, str, list[int]]] = field(default_factory=list)


@dataclass
class RunReplay:
    """One run's logged requests queued again."""

    base_model: str
    last_seq: int  # the run's last logged seq_id
    seq_ids: list[int] = field(default_factory=list)  # queued again (others skipped)
    request_ids: set[str] = field(default_factory=set)


def replay_run(service: Service, model_id: str, last_seq: int | None = None) -> RunReplay | None:
    """Queue the run's logged requests after its stored state, in seq_id order: completed
    ones only for their effect, pending ones complete their futures, failed ones are skipped.
    None if there is nothing to replay (or the run's base model is not served). Used at
    startup and when a replica is lost (engine/replicas.py)."""
    store = service.store
    if last_seq is None:
        last_seq = store.last_logged_seq_ids().get(model_id)
    run = store.get_training_run(model_id)
    scheduler = service.schedulers.get(run.base_model) if run else None
    if run is None or scheduler is None or last_seq is None:
        return None
    state_seq = scheduler.state_seq_id(model_id)
    start = 0 if state_seq is None else state_seq + 1
    if last_seq < start:
        return None
    replay = RunReplay(run.base_model, last_seq)
    for rec in store.futures_for_model(model_id, start):
        assert rec.seq_id is not None
        if rec.status == "failed" or (rec.status == "complete" and _only_saves(rec)):
            scheduler.skip(model_id, rec.seq_id)
            continue
        service.replay(rec)
        replay.request_ids.add(rec.request_id)
        replay.seq_ids.append(rec.seq_id)
    return replay


def replay_moved_run(service: Service, model_id: str) -> int | None:
    """`replay_run` for a run moved off a lost replica: its last logged seq_id, if any."""
    replay = replay_run(service, model_id)
    if replay is None:
        return None
    log.info(
        "run %s: replaying %d logged requests on its new replica", model_id, len(replay.seq_ids)
    )
    return replay.last_seq


def recover(service: Service) -> RecoveryReport:
    """Queue every run's logged requests after its stored state. Call before the schedulers
    start; then `resume_samples` in the background."""
    store, report = service.store, RecoveryReport()
    queued: set[str] = set()
    for model_id, last_seq in store.last_logged_seq_ids().items():
        replay = replay_run(service, model_id, last_seq)
        if replay is None:
            continue  # nothing after its state, or its base model is no longer served
        report.runs += 1
        queued |= replay.request_ids
        report.replayed += len(replay.request_ids)
        report.waits.append((replay.base_model, model_id, last_seq))
        report.plan.append((replay.base_model, model_id, replay.seq_ids))
    for rec in store.unfinished_futures():
        if rec.request_id in queued:
            continue
        if rec.kind == "sample":
            report.samples.append(rec)
        else:
            service.fail_unfinished(rec, "the server restarted before this request could run")
            report.failed += 1
    return report


def _only_saves(rec: FutureRecord) -> bool:
    """A save to a named checkpoint leaves the run as it was: once done, it needs no replay
    (rewriting it could even resurrect a checkpoint deleted since)."""
    if rec.kind in ("save_weights", "save_weights_external"):
        return True
    return rec.kind == "save_weights_for_sampler" and bool(json.loads(rec.request).get("path"))


def resume_samples(service: Service, report: RecoveryReport, timeout: float = 3600) -> None:
    """Wait until the replayed runs are past their logged requests, then re-run the pending
    sample requests (their snapshots exist again by then)."""
    for base_model, model_id, seq_id in report.waits:
        service.schedulers[base_model].wait_applied(model_id, seq_id, timeout)
    for rec in report.samples:
        service.replay(rec)
    if report.samples:
        log.info("re-ran %d sample requests pending at the last shutdown", len(report.samples))


PROGRESS_SECONDS = 5.0


def replay_progress(
    service: Service,
    report: RecoveryReport,
    every: float = PROGRESS_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Log "replaying N logged requests: k/N" at most every `every` seconds until all N are
    taken to run by their schedulers, then once more with the total time."""
    total = report.replayed
    if not total:
        return
    started = last = clock()
    cursors = [0] * len(report.plan)  # per run: how many of its seq_ids are applied

    def applied() -> int:
        for i, (base, model_id, seq_ids) in enumerate(report.plan):
            scheduler = service.schedulers[base]
            while cursors[i] < len(seq_ids) and scheduler.wait_applied(
                model_id, seq_ids[cursors[i]], 0
            ):
                cursors[i] += 1
        return sum(cursors)

    while True:
        done = applied()
        now = clock()
        if done >= total:
            log.info(
                "replaying %d logged requests: %d/%d, done in %.1f s",
                total,
                done,
                total,
                now - started,
            )
            return
        if now - last >= every:
            log.info("replaying %d logged requests: %d/%d", total, done, total)
            last = now
        sleep(min(1.0, every))


def start_recovery(service: Service) -> RecoveryReport:
    """`recover`, logged, with the pending samples resumed on a background thread."""
    report = recover(service)
    service.hooks.recovered(report.runs, report.replayed, report.failed, len(report.samples))
    if report.runs or report.failed or report.samples:
        log.warning(
            "restart: replaying %d requests of %d runs; %d pending requests failed; "
            "%d sample requests wait for the replay",
            report.replayed,
            report.runs,
            report.failed,
            len(report.samples),
        )
    threading.Thread(
        target=resume_samples, args=(service, report), name="recovery", daemon=True
    ).start()
    if report.replayed:
        threading.Thread(
            target=replay_progress, args=(service, report), name="replay-progress", daemon=True
        ).start()
    return report
