"""`tinkerd bench load`: many users at once through the official SDK against one server process.

A `tinkerd serve` subprocess (its own temporary data dir, a tiny random-init model built in code
unless `--model` names one) serves N concurrent SDK clients for a bounded time, each a distinct
user (its own `tml-` key and `ServiceClient`). Train-heavy clients loop forward_backward +
optim_step and now and then save a sampler snapshot and sample from it; sample-heavy clients loop
sampling from their own snapshot and from the base model, training and re-saving now and then.

Figures per request type: count, failures, throughput (requests/s; tokens/s, where tokens are
the inputs of forward_backward and the generated tokens of sample), and p50/p99 latency as the
client sees it (submit until the result is in hand).
Baseline: the same request types from one client alone (each role in turn) on the same server
just before the load, so the latency ratios say what the concurrency costs.
Pass/fail: any failed request, any 4xx/5xx in the server's access log (the SDK retries some of
those silently), or a server RSS growing more than `max_rss_growth_pct` after warm-up. Warm-up
ends after `warmup_fraction` of the load and once the server's bounded cache of sampler snapshots
is full, whichever is later: filling that cache grows RSS by design.
The server runs in the dtype this machine runs fast (bench/dtype.py) unless `--dtype` says.
The last line printed is one JSON object with every figure.
"""

import contextlib
import inspect
import os
import random
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil

from tinkerd.bench.dtype import choose_dtype
from tinkerd.bench.server import ServerProcess, serve
from tinkerd.bench.stats import percentile, slope

T = TypeVar("T")

# Request types, in the order they are reported.
KINDS = (
    "create_training_client",
    "create_sampling_client",
    "forward_backward",
    "optim_step",
    "save_weights_for_sampler",
    "sample",
    "sample_base",
    "close_session",
)
# Token ids are drawn below 256: valid in any vocabulary (the tiny model's is 320).
TOKEN_ID_LIMIT = 256
_ACCESS_STATUS = re.compile(r'"[A-Z]+ \S+ HTTP/[\d.]+" (\d{3})')


@dataclass(frozen=True)
class LoadBenchConfig:
    model: str | None = None  # None: a tiny random-init Llama built in code
    seconds: float = 60.0
    clients: int = 16
    train_fraction: float = 0.5  # share of the clients that are train-heavy
    threads: int = 1  # the server's torch threads (TINKERD_THREADS)
    dtype: str | None = None  # None: bfloat16 with native bf16, else float32 (bench/dtype.py)
    rank: int = 8
    warmup_fraction: float = 0.25  # RSS is judged after this share of the load (see warmup_seconds)
    max_rss_growth_pct: float = 5.0
    baseline_seconds: float = 10.0  # one client alone, split between the two roles; 0: skip
    save_every: int = 4  # train-heavy: steps per sampler snapshot; sample-heavy: samples per step
    seed: int = 0


@dataclass(frozen=True)
class Outcome:
    kind: str
    client: int
    start: float  # seconds since the phase began
    latency: float  # seconds, submit until result
    tokens: int
    error: str | None = None


@dataclass
class Recorder:
    """Every request's outcome, from all client threads."""

    t0: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(
        self, kind: str, client: int, fn: Callable[[], T], tokens: Callable[[T], int] | None = None
    ) -> T | None:
        """Run one request; record its latency, or its error (then None is returned, so the
        client goes on: a failure must be counted, not end the run)."""
        start = time.monotonic()
        try:
            result = fn()
        except Exception as exc:  # every failure is a figure, reported with its error
            outcome = Outcome(kind, client, start - self.t0, time.monotonic() - start, 0, _err(exc))
            result = None
        else:
            n = tokens(result) if tokens else 0
            outcome = Outcome(kind, client, start - self.t0, time.monotonic() - start, n)
        with self.lock:
            self.outcomes.append(outcome)
        return result


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class Client:
    """One user: its own key, ServiceClient, LoRA training client and samplers."""

    def __init__(self, index: int, url: str, model: str, cfg: LoadBenchConfig, rec: Recorder):
        import tinker

        self.index = index
        self.model = model
        self.cfg = cfg
        self.rec = rec
        self.rng = random.Random(cfg.seed * 100_003 + index)
        self.service = tinker.ServiceClient(base_url=url, api_key=f"tml-load-{index}")
        self.training = None
        self.snapshot = None
        self.base_sampler = None

    def _call(
        self, kind: str, fn: Callable[[], T], tokens: Callable[[T], int] | None = None
    ) -> T | None:
        return self.rec.call(kind, self.index, fn, tokens)

    def setup(self) -> bool:
        self.training = self._call(
            "create_training_client",
            lambda: self.service.create_lora_training_client(
                base_model=self.model, rank=self.cfg.rank, seed=self.index
            ).result(),
        )
        self.base_sampler = self._call(
            "create_sampling_client",
            lambda: self.service.create_sampling_client(base_model=self.model).result(),
        )
        return self.training is not None and self.base_sampler is not None

    def train_step(self) -> None:
        from tinker import types

        data = [self._datum() for _ in range(self.rng.randint(1, 4))]
        tokens = sum(d.model_input.length for d in data)
        fwd = self._call(
            "forward_backward",
            lambda: self.training.forward_backward(data, "cross_entropy").result(),
            lambda _: tokens,
        )
        if fwd is not None:
            self._call(
                "optim_step",
                lambda: self.training.optim_step(types.AdamParams(learning_rate=1e-3)).result(),
            )

    def save_snapshot(self) -> None:
        sampler = self._call(
            "save_weights_for_sampler",
            lambda: self.training.save_weights_and_get_sampling_client().result(),
        )
        if sampler is not None:
            self.snapshot = sampler

    def sample(self, base: bool) -> None:
        from tinker import types

        sampler = self.base_sampler if base or self.snapshot is None else self.snapshot
        kind = "sample_base" if sampler is self.base_sampler else "sample"
        prompt = types.ModelInput.from_ints(self._tokens(self.rng.randint(8, 32)))
        params = types.SamplingParams(
            max_tokens=self.rng.randint(8, 24), temperature=1.0, seed=self.rng.randrange(2**31)
        )
        num = self.rng.randint(1, 4)
        self._call(
            kind,
            lambda: sampler.sample(prompt, num, params).result(),
            lambda r: sum(len(s.tokens) for s in r.sequences),
        )

    def run(self, train_heavy: bool, deadline: float) -> None:
        """Loop one role until `deadline` (the request in flight then is finished)."""
        step = 0
        while time.monotonic() < deadline:
            step += 1
            if train_heavy:
                self.train_step()
                if step % self.cfg.save_every == 0:
                    self.save_snapshot()
                    self.sample(base=False)
            else:
                if self.snapshot is None or step % self.cfg.save_every == 0:
                    self.train_step()
                    self.save_snapshot()
                self.sample(base=step % 2 == 0)

    def close(self) -> None:
        self._call("close_session", lambda: self.service.close("success").result(timeout=60))

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(TOKEN_ID_LIMIT) for _ in range(n)]

    def _datum(self):
        from tinker import types

        seq = self._tokens(self.rng.randint(16, 64) + 1)
        return types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * (len(seq) - 1)},
        )


@dataclass
class RssSampler:
    """The server process's RSS (with any children), once a second, in a thread."""

    pid: int
    t0: float
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)
    _stop: threading.Event = field(default_factory=threading.Event)

    @contextlib.contextmanager
    def running(self) -> Iterator["RssSampler"]:
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def _loop(self) -> None:
        proc = psutil.Process(self.pid)
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                rss = proc.memory_info().rss
                for child in proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss += child.memory_info().rss
                self.samples.append((time.monotonic() - self.t0, rss / 2**20))
            self._stop.wait(1.0)


def run_phase(
    url: str, model: str, cfg: LoadBenchConfig, roles: list[bool], seconds: float
) -> tuple[Recorder, float]:
    """Clients with the given roles (True: train-heavy), all at once, for `seconds`; returns the
    outcomes and the phase's wall time (until the last client closed its session)."""
    rec = Recorder()
    deadline = rec.t0 + seconds

    def one(index: int, train_heavy: bool) -> None:
        client = Client(index, url, model, cfg, rec)
        try:
            if client.setup():
                client.run(train_heavy, deadline)
        except Exception as exc:  # a bug outside any request: still a reported failure
            with rec.lock:
                rec.outcomes.append(Outcome("client_loop", index, 0.0, 0.0, 0, _err(exc)))
        client.close()

    threads = [
        threading.Thread(target=one, args=(i, role), name=f"load-client-{i}")
        for i, role in enumerate(roles)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rec, time.monotonic() - rec.t0


def summarize(outcomes: list[Outcome], wall: float) -> dict[str, dict]:
    """Per request type: count, failures, req/s, tokens/s, p50/p99 ms (successes only)."""
    table: dict[str, dict] = {}
    others = sorted({o.kind for o in outcomes} - set(KINDS))
    for kind in (*KINDS, *others):
        mine = [o for o in outcomes if o.kind == kind]
        if not mine:
            continue
        ok = [o.latency * 1000 for o in mine if o.error is None]
        tokens = sum(o.tokens for o in mine)
        table[kind] = {
            "count": len(mine),
            "failures": len(mine) - len(ok),
            "req_per_s": round(len(ok) / wall, 2),
            "tokens_per_s": round(tokens / wall, 1) if tokens else None,
            "p50_ms": round(statistics.median(ok), 1) if ok else None,
            "p99_ms": round(percentile(ok, 0.99), 1) if ok else None,
        }
    return table


def snapshot_cache_size() -> int:
    """How many sampler snapshots the server holds in memory before dropping the oldest."""
    from tinkerd.engine.scheduler import ModelScheduler

    return inspect.signature(ModelScheduler).parameters["max_snapshots"].default


def warmup_seconds(
    cfg: LoadBenchConfig, outcomes: list[Outcome], earlier_snapshots: int
) -> tuple[float, float | None]:
    """When RSS is judged from: after `warmup_fraction` of the load and after the server's
    snapshot cache is full (until then every save adds a snapshot's weights to memory by
    design), but no later than 75 % of the load. Also returns when the cache filled, if it did."""
    saves = sorted(
        o.start + o.latency
        for o in outcomes
        if o.kind == "save_weights_for_sampler" and o.error is None
    )
    needed = snapshot_cache_size() - earlier_snapshots
    full_at = (saves[needed - 1] if needed <= len(saves) else None) if needed > 0 else 0.0
    warmup = cfg.seconds * cfg.warmup_fraction
    if full_at is not None:
        warmup = max(warmup, full_at)
    return min(warmup, cfg.seconds * 0.75), full_at


def rss_figures(samples: list[tuple[float, float]], warmup_s: float) -> dict:
    """RSS after warm-up and at the end (each the median of up to 5 one-second samples, so one
    allocator hiccup doesn't decide), peak, and the least-squares slope after warm-up."""
    after = [(t, mb) for t, mb in samples if t >= warmup_s] or samples[-1:]
    warm = statistics.median(mb for _, mb in after[:5])
    end = statistics.median(mb for _, mb in after[-5:])
    return {
        "rss_after_warmup_mb": round(warm, 1),
        "rss_end_mb": round(end, 1),
        "rss_peak_mb": round(max(mb for _, mb in samples), 1),
        "rss_growth_pct": round((end - warm) / warm * 100, 2),
        "rss_slope_mb_per_min": round(slope(after) * 60, 2),
        "rss_window_s": round(after[-1][0] - after[0][0], 1),
        "rss_samples": len(samples),
        "rss_mb_every_10s": _every(samples, 10.0),
    }


def _every(samples: list[tuple[float, float]], step: float) -> list[float]:
    """The first sample at or after each multiple of `step` seconds: the shape of the curve."""
    picked: list[float] = []
    for t, mb in samples:
        if t >= len(picked) * step:
            picked.append(round(mb, 1))
    return picked


def http_statuses(log: str) -> dict[str, int]:
    """Response status counts from uvicorn's access log lines."""
    counts: dict[str, int] = {}
    for status in _ACCESS_STATUS.findall(log):
        counts[status] = counts.get(status, 0) + 1
    return dict(sorted(counts.items()))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def print_table(table: dict[str, dict], solo: dict[str, dict]) -> None:
    head = ("request", "count", "fail", "req/s", "tokens/s", "p50 ms", "p99 ms", "solo p50")
    print("  ".join(f"{h:>10}" if i else f"{h:<24}" for i, h in enumerate(head)))
    for kind, row in table.items():
        cells = [row["count"], row["failures"], row["req_per_s"], row["tokens_per_s"]]
        cells += [row["p50_ms"], row["p99_ms"], solo.get(kind, {}).get("p50_ms")]
        print(f"{kind:<24}  " + "  ".join(f"{_fmt(c):>10}" for c in cells))


def failure_lines(outcomes: list[Outcome], limit: int = 10) -> list[str]:
    """Distinct errors by request type, with how many times each occurred."""
    seen: dict[tuple[str, str], int] = {}
    for o in outcomes:
        if o.error is not None:
            seen[(o.kind, o.error)] = seen.get((o.kind, o.error), 0) + 1
    return [f"{kind} x{n}: {err}" for (kind, err), n in list(seen.items())[:limit]]


def roles_for(cfg: LoadBenchConfig) -> list[bool]:
    n_train = round(cfg.clients * cfg.train_fraction)
    return [i < n_train for i in range(cfg.clients)]


def run(cfg: LoadBenchConfig) -> dict:
    from tinkerd.model.tiny import build_tiny_model

    os.environ.setdefault("TINKER_TELEMETRY", "0")
    choice = choose_dtype(cfg.dtype)
    print(choice.header(), flush=True)
    with tempfile.TemporaryDirectory(prefix="tinkerd-load-") as tmp:
        work = Path(tmp)
        model = cfg.model or str(build_tiny_model(work / "tiny-model"))
        log_path = work / "server.log"
        with serve(
            model,
            work / "data",
            threads=cfg.threads,
            dtype=choice.dtype,
            log_path=log_path,
            env=choice.serve_env(),
        ) as srv:
            solo: dict[str, dict] = {}
            if cfg.baseline_seconds > 0:
                print(f"baseline: one client alone, {cfg.baseline_seconds:g} s", flush=True)
                solo_out: list[Outcome] = []
                solo_wall = 0.0
                for role in (True, False):
                    rec, wall = run_phase(srv.url, model, cfg, [role], cfg.baseline_seconds / 2)
                    solo_out += rec.outcomes
                    solo_wall += wall
                # Latencies only: each role ran for part of the wall time, so rates would mislead.
                solo = {
                    kind: {k: v for k, v in row.items() if not k.endswith("_per_s")}
                    for kind, row in summarize(solo_out, solo_wall).items()
                }
            roles = roles_for(cfg)
            n_train = sum(roles)
            print(
                f"load: {cfg.clients} clients ({n_train} train-heavy, "
                f"{cfg.clients - n_train} sample-heavy) for {cfg.seconds:g} s",
                flush=True,
            )
            log_offset = log_path.stat().st_size
            sampler = RssSampler(srv.proc.pid, time.monotonic())
            with sampler.running():
                rec, wall = run_phase(srv.url, model, cfg, roles, cfg.seconds)
            results = _results(cfg, srv, rec, wall, solo, sampler, log_offset)
    results["dtype"], results["dtype_reason"] = choice.dtype, choice.reason
    results["server_exit_code"] = code = srv.proc.returncode
    if code != 0:
        results["problems"].append(f"the server exited with status {code} on SIGTERM")
        results["ok"] = False
        print(f"PROBLEM: the server exited with status {code} on SIGTERM")
    return results


def _results(
    cfg: LoadBenchConfig,
    srv: ServerProcess,
    rec: Recorder,
    wall: float,
    solo: dict[str, dict],
    sampler: RssSampler,
    log_offset: int,
) -> dict:
    table = summarize(rec.outcomes, wall)
    print_table(table, solo)
    load_log = srv.log_path.read_bytes()[log_offset:].decode(errors="replace")
    statuses = http_statuses(load_log)
    solo_saves = solo.get("save_weights_for_sampler", {"count": 0, "failures": 0})
    solo_snapshots = solo_saves["count"] - solo_saves["failures"]
    warmup, cache_full_at = warmup_seconds(cfg, rec.outcomes, solo_snapshots)
    rss = rss_figures(sampler.samples, warmup)
    if cache_full_at is None:
        print(
            f"note: the server's {snapshot_cache_size()}-snapshot cache was still filling at "
            "the end: the RSS growth includes it (run longer to judge leaks)"
        )
    print(
        f"server RSS: {rss['rss_after_warmup_mb']} MB after warm-up "
        f"({warmup:.0f} s), {rss['rss_end_mb']} MB at the end, "
        f"peak {rss['rss_peak_mb']} MB; {rss['rss_growth_pct']:+g} % "
        f"(limit {cfg.max_rss_growth_pct:g} %), slope {rss['rss_slope_mb_per_min']:+g} MB/min "
        f"over {rss['rss_window_s']:g} s"
    )
    print(f"HTTP statuses in the server's access log during the load: {statuses}")
    failures = failure_lines(rec.outcomes)
    # 499: the client closed the request (an SDK poller cancelled at its shutdown).
    http_errors = sum(n for status, n in statuses.items() if int(status) >= 400 and status != "499")
    problems = [f"failed request: {line}" for line in failures]
    if http_errors:
        problems.append(f"{http_errors} responses with status >= 400 (the SDK may have retried)")
    if rss["rss_growth_pct"] > cfg.max_rss_growth_pct:
        problems.append(
            f"server RSS grew {rss['rss_growth_pct']:g} % after warm-up "
            f"(limit {cfg.max_rss_growth_pct:g} %): possible leak"
        )
    server_errors = [ln for ln in load_log.splitlines() if " ERROR " in ln or "Traceback" in ln]
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems))
        if server_errors:
            print("server log errors:\n  " + "\n  ".join(server_errors[:20]))
    return {
        "model": cfg.model or "tiny random-init Llama (built in code)",
        "clients": cfg.clients,
        "train_heavy_clients": sum(roles_for(cfg)),
        "seconds": cfg.seconds,
        "wall_s": round(wall, 1),
        "server_threads": cfg.threads,
        "requests": sum(row["count"] for row in table.values()),
        "failures": sum(row["failures"] for row in table.values()),
        "per_type": table,
        "solo_baseline": solo,
        "p50_ratio_vs_solo": {
            kind: round(row["p50_ms"] / solo[kind]["p50_ms"], 2)
            for kind, row in table.items()
            if row["p50_ms"] and solo.get(kind, {}).get("p50_ms")
        },
        "warmup_s": round(warmup, 1),
        "snapshot_cache_full_at_s": None if cache_full_at is None else round(cache_full_at, 1),
        **rss,
        "max_rss_growth_pct": cfg.max_rss_growth_pct,
        "http_statuses": statuses,
        "server_log_errors": len(server_errors),
        "problems": problems,
        "ok": not problems,
    }
