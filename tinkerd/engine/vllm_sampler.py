"""The control-plane side of the vLLM sampler pool (GPU deployments; docs/vllm.md).

vLLM pins other transformers/fastapi versions than tinkerd, so it runs in its own venv as a
child process (`tinkerd/vllm_runner.py`, JSON lines over pipes) that this module starts, owns
and ends by its process id. Sampler snapshots reach it as PEFT adapter directories (the format
`adapter_files.write_adapter` writes), each version under a fresh LoRA int id, since vLLM
caches adapters by id.

Only requests vLLM serves with Tinker's semantics go there (`vllm_unsupported` says why the
others stay on tinkerd's own sampler). The entry point for the scheduler is
`VllmSamplerPool.try_submit(op)`: it takes an eligible `Sample` op, runs it on the pool's own
thread (batched with the other ops waiting there) and calls `op.done`/`op.fail`.

Nothing here imports vllm: the default server path never needs it.
"""

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tinkerd.engine.ops import Op, Sample, UserError
from tinkerd.engine.telemetry import BatchPart, Telemetry
from tinkerd.model.loading import BaseModelInfo
from tinkerd.model.sampling import row_seed, stop_conditions
from tinkerd.model.types import SampledSequence, SampleInput, SampleOutput

log = logging.getLogger(__name__)

RUNNER = Path(__file__).resolve().parent.parent / "vllm_runner.py"

# vLLM treats temperatures below this as greedy (and then reports temperature-1 logprobs);
# tinkerd samples at any temperature > 0, so such requests stay on tinkerd's sampler.
VLLM_GREEDY_EPS = 1e-5

# Environment of the runner: no hub or telemetry traffic, loopback only, a bounded CPU KV cache
# (ignored by GPU builds). Values already set by the operator win.
RUNNER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def vllm_unsupported(item: SampleInput) -> str | None:
    """Why `item` must stay on tinkerd's own sampler (None: vLLM serves it faithfully).

    Sampled-token logprobs are Tinker's log_softmax(z / T) before truncation; vLLM's
    processed_logprobs equal that only without top-k/top-p, so truncated sampling stays here.
    vLLM has no equivalent of the prompt extras, the stability records or image input, and
    streams no tokens through `on_token`.
    """
    p = item.params
    if p.temperature > 0 and (p.top_k != -1 or p.top_p < 1.0):
        return "top-k/top-p truncation (vLLM reports truncated logprobs)"
    if 0 < p.temperature < VLLM_GREEDY_EPS:
        return f"temperature {p.temperature} (vLLM treats it as greedy)"
    reasons = [
        (item.topk_sample_logprobs > 0, "topk_sample_logprobs"),
        (item.topk_prompt_logprobs > 0, "topk_prompt_logprobs"),
        (item.target_prompt_logprobs is not None, "target_prompt_logprobs"),
        (item.prompt_alt_tokens_k > 0, "prompt_alt_tokens_k"),
        (item.record_stability, "record_stability_info"),
        (bool(item.prompt_images), "image input"),
        (item.on_token is not None, "token streaming"),
    ]
    for unsupported, what in reasons:
        if unsupported:
            return f"{what} (no vLLM equivalent)"
    return None


class VllmError(RuntimeError):
    """The vLLM runner failed or is gone."""


Answer = Callable[[list[dict[str, Any]] | VllmError], object]  # a request line's outputs


@dataclass(frozen=True)
class VllmConfig:
    """How to start the runner. `python`: the vLLM venv's interpreter; `model_dir`: the base
    model's local directory (the one tinkerd loads)."""

    python: Path
    model_dir: Path
    dtype: str = "float32"
    max_lora_rank: int = 64
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    start_timeout: float = 900.0
    request_timeout: float = 3600.0
    log_path: Path | None = None  # the runner's stderr (vLLM's logs); None: a temp file

    def engine_settings(self) -> dict[str, Any]:
        return {
            "model": str(self.model_dir),
            "dtype": self.dtype,
            "max_lora_rank": self.max_lora_rank,
            "max_loras": self.max_loras,
            "max_cpu_loras": self.max_cpu_loras,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager,
        }


class VllmProcess:
    """The runner child process: started in its own session (its engine processes with it),
    ended by its process id. Any number of threads may `generate` at once: their requests
    decode together in the runner's engine, and each call returns when its own are done.
    A request line unanswered after `request_timeout` fails with VllmError (a watchdog thread:
    a hung runner that stays alive must not hold its callers forever), and the runner is told
    to abort it (its requests stop decoding); a late answer is dropped."""

    def __init__(self, config: VllmConfig) -> None:
        self.config = config
        self._lock = threading.Lock()  # writes to the runner's stdin, and the waiters
        self._lines: queue.Queue[str | None] = queue.Queue()  # the start handshake
        # request line id -> who gets its answer, and by when
        self._waiting: dict[int, tuple[Answer, float]] = {}
        self._gone = False  # the runner's output ended
        self._next_id = 0
        self.version = ""
        self.device = ""  # the engine's device type, from the runner
        self.log_path = config.log_path or Path(
            tempfile.mkstemp(prefix="tinkerd-vllm-", suffix=".log")[1]
        )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update({k: v for k, v in RUNNER_ENV.items() if k not in os.environ})
        settings = json.dumps(config.engine_settings())
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        # -I: the vLLM venv's own packages only (no script dir, user site or PYTHON* vars).
        self.proc = subprocess.Popen(
            [str(config.python), "-I", str(RUNNER), settings],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=env,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        first = self._next_line(config.start_timeout, "start")
        if not first.get("ready"):
            self.close()
            raise VllmError(f"vLLM runner failed to start: {first.get('error')}{self._tail()}")
        self.version = str(first.get("vllm", ""))
        self.device = str(first.get("device", ""))
        log.info("vLLM %s sampler started (pid %d)", self.version, self.proc.pid)
        threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        """The first line is the handshake; every later one answers a `send`."""
        assert stream is not None
        started = False
        for line in stream:
            if not started:
                started = True
                self._lines.put(line)
                continue
            answer = json.loads(line)
            with self._lock:
                waiter = self._waiting.pop(answer.get("id"), None)
            if waiter is not None:
                waiter[0](self._result(answer))
        with self._lock:
            self._gone = True
            waiters, self._waiting = list(self._waiting.values()), {}
        for on_answer, _ in waiters:
            on_answer(VllmError(f"vLLM runner exited ({self.proc.poll()}){self._tail()}"))
        self._lines.put(None)

    def _watch(self) -> None:
        """Fail request lines past their deadline, until the runner's output ends."""
        period = min(1.0, self.config.request_timeout / 4)
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                if self._gone:
                    return
                late = [rid for rid, (_, due) in self._waiting.items() if due <= now]
                expired = [self._waiting.pop(rid)[0] for rid in late]
                for rid in late:
                    with contextlib.suppress(OSError):  # a gone runner decodes nothing
                        self._write({"op": "abort", "id": rid})
            for on_answer in expired:
                on_answer(
                    VllmError(
                        f"vLLM runner: no answer within the request timeout "
                        f"({self.config.request_timeout:g} s)"
                    )
                )

    def _result(self, answer: dict[str, Any]) -> list[dict[str, Any]] | VllmError:
        if answer.get("ok"):
            outputs: list[dict[str, Any]] = answer["outputs"]
            return outputs
        if answer.get("fatal"):  # the runner exits: end its engine processes too
            with self._lock:
                self._gone = True
            threading.Thread(target=self.close, daemon=True).start()
        return VllmError(f"vLLM generate failed: {answer.get('error')}")

    def _tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n  vLLM log (" + str(self.log_path) + "):\n    " + "\n    ".join(text)

    def _next_line(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise VllmError(f"vLLM runner: no answer to {what} within {timeout:.0f} s") from None
        if line is None:
            self.close()
            raise VllmError(f"vLLM runner exited ({self.proc.poll()}){self._tail()}")
        message: dict[str, Any] = json.loads(line)
        return message

    def send(self, requests: list[dict[str, Any]], on_answer: Answer) -> None:
        """Send one request line (see the runner's docstring for the fields); `on_answer`
        gets its outputs, or the error, on the reader thread once its last request is done.
        Lines sent meanwhile decode together in the runner's engine."""
        with self._lock:
            if self._gone or self.proc.poll() is not None or self.proc.stdin is None:
                raise VllmError(f"vLLM runner is not running ({self.proc.poll()}){self._tail()}")
            self._next_id += 1
            rid = self._next_id
            self._waiting[rid] = (on_answer, time.monotonic() + self.config.request_timeout)
            try:
                self._write({"id": rid, "requests": requests})
            except OSError as exc:
                del self._waiting[rid]
                raise VllmError(f"vLLM runner is gone: {exc}{self._tail()}") from exc

    def _write(self, message: dict[str, Any]) -> None:
        """One JSON line to the runner's input (the caller holds the lock)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`send`, and wait for the answer."""
        got: list[list[dict[str, Any]] | VllmError] = []
        answered = threading.Event()
        self.send(requests, lambda result: (got.append(result), answered.set()))
        answered.wait()  # the watchdog or the reader answers, whatever the runner does
        if isinstance(got[0], VllmError):
            raise got[0]
        return got[0]

    @property
    def alive(self) -> bool:
        return not self._gone and self.proc.poll() is None

    def close(self, timeout: float = 30.0) -> None:
        """Ask the runner to exit; past `timeout`, end its process group (it leads it)."""
        proc = self.proc
        if proc.poll() is None:
            try:
                with self._lock:
                    if proc.stdin is not None and not proc.stdin.closed:
                        proc.stdin.write(json.dumps({"op": "shutdown"}) + "\n")
                        proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    proc.wait(10)
        # Engine processes left behind by a runner that exited share its group id.
        self._signal(signal.SIGKILL)
        self._log_file.close()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


@dataclass
class _LoraVersions:
    """A fresh vLLM LoRA int id per adapter version (a directory's weights file as written)."""

    next_id: int = 1
    ids: dict[tuple[str, str, tuple[int, int, int]], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, adapter_id: str, directory: Path) -> dict[str, Any]:
        weights = directory / "adapter_model.safetensors"
        try:
            st = weights.stat()
        except FileNotFoundError:
            raise UserError(f"sampler weights {adapter_id!r}: no adapter in {directory}") from None
        key = (adapter_id, str(directory.resolve()), (st.st_mtime_ns, st.st_size, st.st_ino))
        with self.lock:
            if key not in self.ids:
                self.ids = {k: v for k, v in self.ids.items() if k[:2] != key[:2]}
                self.ids[key] = self.next_id
                self.next_id += 1
            lora_id = self.ids[key]
        return {"name": f"{adapter_id}#{lora_id}", "id": lora_id, "path": str(directory)}


IDENTITY = "tinkerd-identity"  # the zero adapter base-model requests use on a CPU build


class VllmSampler:
    """A sampler backed by vLLM: `sample(inputs, adapter_dirs)` like `ModelWorker.sample`,
    with every adapter's PEFT directory given. Inputs must pass `vllm_unsupported` and
    tinkerd's own validation first.

    `identity_dir`: a PEFT adapter of the base model whose B matrices are zero. On vLLM's CPU
    build, base-model requests run under it: there a request without LoRA indexes the LoRA
    slots at -1 (its torch fallback ops, `lora_b_weights[indices]`), which is the last slot,
    so once every slot holds an adapter, base-model requests get that adapter's delta
    (measured with vllm-cpu 0.32: a first-token logprob off by 0.18 nats). A zero adapter
    adds exactly nothing. GPU builds (Triton kernels skip -1) do not need it."""

    def __init__(
        self, config: VllmConfig, info: BaseModelInfo, identity_dir: Path | None = None
    ) -> None:
        self.info = info
        self.process = VllmProcess(config)
        self._loras = _LoraVersions()
        self.identity_dir = identity_dir
        self._warned = False

    def sample(
        self, inputs: list[SampleInput], adapter_dirs: Mapping[str, Path]
    ) -> list[SampleOutput]:
        """Every input's output, sent as one request line (blocks until all are done)."""
        requests = [r for item in inputs for r in self._vllm_requests(item, adapter_dirs)]
        outputs = self.process.generate(requests) if requests else []
        results = []
        at = 0
        for item in inputs:
            mine = outputs[at : at + item.num_samples]
            at += item.num_samples
            results.append(self._output(item, mine))
        return results

    def submit(
        self,
        item: SampleInput,
        adapter_dirs: Mapping[str, Path],
        done: Callable[[SampleOutput | Exception], object],
    ) -> None:
        """Send one input as its own request line; `done` gets its output (or the error) when
        its samples are done, whatever else is decoding. Raises for an input vLLM cannot take."""
        requests = self._vllm_requests(item, adapter_dirs)

        def answered(result: list[dict[str, Any]] | VllmError) -> None:
            done(result if isinstance(result, VllmError) else self._output(item, result))

        self.process.send(requests, answered)

    def _vllm_requests(
        self, item: SampleInput, adapter_dirs: Mapping[str, Path]
    ) -> list[dict[str, Any]]:
        reason = vllm_unsupported(item)
        if reason is not None:
            raise ValueError(f"not a vLLM request: {reason}")
        lora = None
        if item.adapter_id is not None:
            if item.adapter_id not in adapter_dirs:
                raise UserError(f"sampler weights {item.adapter_id!r} have no adapter files")
            lora = self._loras.request(item.adapter_id, adapter_dirs[item.adapter_id])
            if self.process.device == "cpu" and self.identity_dir is None and not self._warned:
                self._warned = True
                log.warning(
                    "vLLM on CPU without an identity adapter: base-model samples "
                    "taken after adapters fill its LoRA slots may be wrong"
                )
        elif self.process.device == "cpu" and self.identity_dir is not None:
            lora = self._loras.request(IDENTITY, self.identity_dir)
        return self._requests(item, lora)

    def _requests(self, item: SampleInput, lora: dict[str, Any] | None) -> list[dict[str, Any]]:
        """One vLLM request per sample, seeded like tinkerd's rows (row_seed), so samples of
        one seeded request differ from each other and repeat across calls; prompt logprobs on
        the first only."""
        p = item.params
        stop_tokens, stop_strings = stop_conditions(p, self.info.eos_token_ids)
        return [
            {
                "prompt": item.prompt,
                "max_tokens": p.max_tokens,
                "temperature": p.temperature,
                "seed": None if p.seed is None else row_seed(p.seed, s),
                "stop_token_ids": sorted(stop_tokens),
                "stop": list(stop_strings),
                "prompt_logprobs": item.prompt_logprobs and s == 0,
                "lora": lora,
            }
            for s in range(item.num_samples)
        ]

    def _output(self, item: SampleInput, outputs: list[dict[str, Any]]) -> SampleOutput:
        stop_tokens, _ = stop_conditions(item.params, self.info.eos_token_ids)
        sequences = []
        for out in outputs:
            tokens = [int(t) for t in out["tokens"]]
            # tinkerd checks stops before the length limit; vLLM the other way round.
            stopped = out["finish"] == "stop" or bool(tokens and tokens[-1] in stop_tokens)
            logprobs = [float(x) for x in out["logprobs"]]
            sequences.append(SampledSequence(tokens, logprobs, "stop" if stopped else "length"))
        prompt_logprobs = None
        if item.prompt_logprobs:
            prompt_logprobs = list(outputs[0]["prompt_logprobs"])
            if item.prompt_logprobs_last_n:
                first = len(item.prompt) - 1 - item.prompt_logprobs_last_n
                prompt_logprobs[: first + 1] = [None] * (first + 1)
        return SampleOutput(sequences, prompt_logprobs)

    def close(self) -> None:
        self.process.close()


class VllmSamplerPool:
    """vLLM sampling beside a `ModelScheduler`: eligible sample ops run here, the rest stay
    with the scheduler. The pool's thread sends each queued op to the runner as its own
    request line at once: the runner decodes everything sent in one continuous batch, and an
    op completes (on the runner's reader thread) as soon as its own samples are done.

    Hooking it in (engine/scheduler.py; `pool` is None unless `Settings.vllm_python` is set):
    * `ModelScheduler.submit(op)`: for a `Sample` op, `if pool.try_submit(op): return True`
      before queueing it (False: the op is untouched and goes to tinkerd's sampler as before).
    * After a `SnapshotAdapter` barrier (scheduler thread, before `op.done`):
      `d = pool.new_snapshot_dir(); handle.save_adapter(snapshot_id, d, base_model,
      with_optimizer=False); pool.register_snapshot(snapshot_id, d)`, so an in-memory snapshot
      (ephemeral or inflight) has adapter files. Saved snapshots need nothing: their
      `Sample.snapshot_dir` is used. Without registration, such samples stay on tinkerd.
    * When the scheduler drops a snapshot from memory: `pool.forget(snapshot_id)`.
    * `cancel_sample(request_id)`: also try `pool.cancel(request_id)`.
    * Construct it with `fallback=scheduler.submit` and `telemetry=scheduler.telemetry`: if
      the runner dies, its ops go back to tinkerd's sampler; taken ops report like the
      scheduler's own.
    * On shutdown: `pool.close()`.
    """

    def __init__(
        self,
        sampler: VllmSampler,
        work_dir: Path,
        *,
        telemetry: Telemetry | None = None,
        fallback: Callable[[Op], object] | None = None,
    ) -> None:
        self.sampler = sampler
        # Where ops go when the runner has died (e.g. the scheduler's `submit`, which then
        # keeps them: `try_submit` refuses everything once the runner is gone). None: they fail.
        self.fallback = fallback
        # The scheduler's observer (metrics, traces): ops taken here report to it as its own do.
        self.telemetry = telemetry or Telemetry()
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self._cv = threading.Condition()
        self._ops: deque[tuple[Op, str | None, Path | None]] = deque()
        self._snapshots: dict[str, tuple[Path, int | None]] = {}
        self._versions = 0
        self._running: Counter[Path] = Counter()  # adapter dirs of the ops being sampled
        self._stale: set[Path] = set()  # replaced versions to remove once unused
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="vllm-sampler", daemon=True)
        self._thread.start()

    @classmethod
    def start(
        cls,
        config: VllmConfig,
        info: BaseModelInfo,
        work_dir: Path,
        telemetry: Telemetry | None = None,
        identity_dir: Path | None = None,
    ) -> "VllmSamplerPool":
        """Start the runner (blocks until its engine is up: tens of seconds) and the pool.
        `identity_dir`: see `VllmSampler`."""
        return cls(VllmSampler(config, info, identity_dir), work_dir, telemetry=telemetry)

    def try_submit(self, op: Op) -> bool:
        """Take `op` if it is a sample vLLM serves faithfully and its adapter has files;
        then the pool completes it. False: not taken (the caller runs it as before)."""
        action = op.action
        if not isinstance(action, Sample) or vllm_unsupported(action.input) is not None:
            return False
        if not self.sampler.process.alive:
            return False
        adapter_id = action.input.adapter_id
        directory = None
        if adapter_id is not None:
            with self._cv:
                known = self._snapshots.get(adapter_id)
            directory = known[0] if known else action.snapshot_dir
            if directory is None or not (directory / "adapter_config.json").is_file():
                return False
        with self._cv:
            if self._stopping:
                return False
            self._ops.append((op, adapter_id, directory))
            self._cv.notify()
        self.telemetry.op_queued(self.sampler.info.name, op.request_id, time.time())
        return True

    def new_snapshot_dir(self) -> Path:
        """A fresh directory (a new version) for an in-memory snapshot's adapter files."""
        with self._cv:
            self._versions += 1
            return self.work_dir / f"v{self._versions}"

    def register_snapshot(
        self, snapshot_id: str, directory: Path, weights_step: int | None = None
    ) -> None:
        """Serve `snapshot_id` from the PEFT directory just written (a `new_snapshot_dir`, so
        a re-taken snapshot id gets new files and a fresh LoRA id); the pool owns it now."""
        with self._cv:
            old = self._snapshots.get(snapshot_id)
            self._snapshots[snapshot_id] = (directory, weights_step)
        if old is not None and old[0] != directory:
            self._remove_later(old[0])

    def forget(self, snapshot_id: str) -> None:
        """The snapshot left the scheduler's memory: drop its files here too."""
        with self._cv:
            old = self._snapshots.pop(snapshot_id, None)
        if old is not None:
            self._remove_later(old[0])

    def _remove_later(self, directory: Path) -> None:
        """Remove a replaced version's files once no queued op names them."""
        with self._cv:
            if any(d == directory for _, _, d in self._ops) or self._running[directory] > 0:
                self._stale.add(directory)
                return
        shutil.rmtree(directory, ignore_errors=True)

    def cancel(self, request_id: str) -> Op | None:
        """Take a queued (not started) op out; the caller fails it. None if not queued."""
        with self._cv:
            for i, (op, _, _) in enumerate(self._ops):
                if op.request_id == request_id:
                    del self._ops[i]
                    return op
        return None

    def queued(self) -> int:
        with self._cv:
            return len(self._ops)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._ops and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                taken = list(self._ops)
                self._ops.clear()
                self._running.update(d for _, _, d in taken if d is not None)
            start = time.time()
            for op, aid, directory in taken:
                self._send(op, aid, directory, start)

    def _send(self, op: Op, aid: str | None, directory: Path | None, start: float) -> None:
        self.telemetry.op_started(self.sampler.info.name, op.request_id, start)
        item = op.action.input  # type: ignore[union-attr]
        dirs = {aid: directory} if aid is not None and directory is not None else {}
        try:
            self.sampler.submit(
                item, dirs, lambda result: self._finish(op, aid, directory, start, result)
            )
        except Exception as exc:
            self._finish(op, aid, directory, start, exc)

    def _finish(
        self,
        op: Op,
        aid: str | None,
        directory: Path | None,
        start: float,
        result: SampleOutput | Exception,
    ) -> None:
        """Complete `op` (or hand it back to tinkerd's sampler if the runner is gone)."""
        try:
            if isinstance(result, Exception):
                if self.fallback is not None and not self.sampler.process.alive:
                    log.error("vLLM runner is gone (%s); sampling falls back to tinkerd", result)
                    self.fallback(op)
                else:
                    op.fail(result)
                return
            item = op.action.input  # type: ignore[union-attr]
            part = BatchPart(op.request_id, item.num_samples, len(item.prompt), tokens(result))
            self.telemetry.sample_batch(self.sampler.info.name, start, time.time(), [part])
            log.info(
                "vLLM sampled 1 requests, %d tokens, in %.2f s", part.sampled, time.time() - start
            )
            if aid is not None:
                with self._cv:
                    snapshot = self._snapshots.get(aid)
                result.weights_step = snapshot[1] if snapshot else None
            op.done(result)
        finally:
            with self._cv:
                if directory is not None:
                    self._running[directory] -= 1
                    self._running = +self._running  # drop zero counts
                stale, self._stale = self._stale, set()
            for old in stale:
                self._remove_later(old)

    def close(self) -> None:
        """Fail the queued ops, stop the thread, end the runner, remove the written files."""
        with self._cv:
            self._stopping = True
            pending = list(self._ops)
            self._ops.clear()
            written = [d for d, _ in self._snapshots.values()] + list(self._stale)
            self._snapshots.clear()
            self._cv.notify_all()
        for op, _, _ in pending:
            op.fail(VllmError("the vLLM sampler pool is shutting down"))
        self._thread.join(timeout=60)
        self.sampler.close()  # ops still decoding get "runner exited" (or fall back)
        for directory in written:
            shutil.rmtree(directory, ignore_errors=True)


def tokens(out: SampleOutput) -> int:
    return sum(len(seq.tokens) for seq in out.sequences)


def default_python(repo: Path) -> Path | None:
    """`<repo>/.vllm-venv/bin/python` when `make vllm-venv` built it."""
    python = repo / ".vllm-venv" / "bin" / "python"
    return python if python.is_file() else None


__all__ = [
    "IDENTITY",
    "VllmConfig",
    "VllmError",
    "VllmSampler",
    "VllmSamplerPool",
    "default_python",
    "vllm_unsupported",
]
