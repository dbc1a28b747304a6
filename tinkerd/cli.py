"""The `tinkerd` command line."""

import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tinkerd.config import Settings, parse_model_spec

if TYPE_CHECKING:
    from tinkerd.store.store import Store

app = typer.Typer(help="tinkerd: self-hosted server for the Tinker fine-tuning API.")
bench_app = typer.Typer(help="Benchmarks (each prints a JSON line of figures last).")
app.add_typer(bench_app, name="bench")
keys_app = typer.Typer(help="API keys: users of this server (see docs/security.md).")
app.add_typer(keys_app, name="keys")
export_app = typer.Typer(help="Export a checkpoint for other runtimes (reads the data dir).")
app.add_typer(export_app, name="export")

DataDirOption = Annotated[
    Path | None, typer.Option(help="Data directory [env: TINKERD_DATA_DIR]", show_default=False)
]
DatabaseUrlOption = Annotated[
    str | None, typer.Option(help="SQLAlchemy URL [env: TINKERD_DATABASE_URL]")
]
BenchDtypeOption = typer.Option(
    help="bfloat16 | float32 (default: bfloat16 on CUDA and on CPUs with native bf16 "
    "matmuls, else float32; the output's first line says which and why)",
    show_default=False,
)


def _settings(**overrides: object) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env: TINKERD_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env: TINKERD_PORT]")] = None,
    data_dir: DataDirOption = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Base model: hub name, local directory, or NAME=PATH (a local directory "
            "served under NAME, e.g. Qwen/Qwen3-8B=/models/qwen3-8b); repeatable "
            "[env: TINKERD_MODELS]"
        ),
    ] = None,
    trust_remote_code: Annotated[
        list[str] | None,
        typer.Option(
            "--trust-remote-code",
            help="Served model NAME allowed to run the Python code it ships (e.g. Kimi-K2); "
            "repeatable; off for every model by default [env: TINKERD_TRUST_REMOTE_CODE]",
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32 | bfloat16 [env: TINKERD_DTYPE]")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda [env: TINKERD_DEVICE]")] = None,
    allow_slow_bf16: Annotated[
        bool,
        typer.Option(
            "--allow-slow-bf16",
            help="Serve --dtype bfloat16 on a CPU without native bf16 matmuls (tens to "
            "hundreds of times slower than float32) [env: TINKERD_ALLOW_SLOW_BF16]",
            show_default=False,
        ),
    ] = False,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Serve a non-loopback host with no registered API key [env: TINKERD_INSECURE]",
            show_default=False,
        ),
    ] = False,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            help="Server log lines: text | json (one JSON object per line) "
            "[env: TINKERD_LOG_FORMAT]",
            show_default=False,
        ),
    ] = None,
    vllm_python: Annotated[
        Path | None,
        typer.Option(
            "--vllm-python",
            help="Python of a vLLM venv (`make vllm-venv`): eligible samples run on a vLLM "
            "sampler pool, see docs/vllm.md [env: TINKERD_VLLM_PYTHON]",
            show_default=False,
        ),
    ] = None,
    replicas: Annotated[
        list[str] | None,
        typer.Option(
            "--replicas",
            help="Worker replicas on Ray: MODEL=N (N replicas of a served model) or MODEL=NxK "
            "(each on K devices); repeatable; needs `pip install tinkerd[ray]` "
            "[env: TINKERD_REPLICAS, JSON list: '[\"MODEL=2\"]']",
            show_default=False,
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Ray cluster to run replicas on (HOST:PORT of `ray start --head`); default: "
            "a local Ray started and ended by tinkerd [env: TINKERD_RAY_ADDRESS]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the Tinker-compatible HTTP server."""
    import signal
    import sys

    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        models=model,
        trust_remote_code=trust_remote_code,
        database_url=database_url,
        dtype=dtype,
        device=device,
        insecure=insecure or None,  # unset: TINKERD_INSECURE decides
        allow_slow_bf16=allow_slow_bf16 or None,  # unset: TINKERD_ALLOW_SLOW_BF16 decides
        log_format=log_format,
        vllm_python=vllm_python,
        replicas=replicas,
        ray_address=ray_address,
    )
    registered = _check_exposure(settings)
    _check_models(settings)
    _check_replicas(settings)
    if settings.threads is None:  # torch's default, fixed before this thread goes single
        import torch

        settings = settings.model_copy(update={"threads": torch.get_num_threads()})
    from tinkerd.engine.threads import single_threaded

    single_threaded()  # before the bf16 probe's matmul: no OpenMP pool in this thread
    _check_bf16(settings)

    # Imported after the check (they pull in torch), so a refusal is immediate.
    import uvicorn

    from tinkerd import logs
    from tinkerd.api.app import create_app

    logs.configure(settings.log_format)
    url = f"http://{settings.host}:{settings.port}"
    names = ", ".join(spec.name for spec in settings.model_specs())
    typer.echo(f"tinkerd: serving {names} at {url}")
    typer.echo(f"  export TINKER_BASE_URL={url}")
    if registered:
        typer.echo("  export TINKER_API_KEY=...   # a key from `tinkerd keys create --name NAME`")
    else:
        typer.echo("  export TINKER_API_KEY=tml-local   # any key starting with tml-")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal under the handler
    # that was in place before it started: make that one a clean exit (status 0).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # uvicorn's own lines (startup, shutdown) go through the root logger set up above; its
    # access log is off: the request-log middleware (api/app.py) writes one line per request.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,
        access_log=False,
    )


def _check_models(settings: Settings) -> None:
    """Refuse bad `--model` specs, and local models that ship code nobody allowed, before
    anything heavy loads (hub models are checked when they load)."""
    for spec in settings.models:
        try:
            parsed = parse_model_spec(spec)
        except ValueError as exc:
            typer.echo(f"tinkerd: {exc}", err=True)
            raise typer.Exit(2) from exc
        config = Path(parsed.source) / "config.json"
        if parsed.name in settings.trust_remote_code or not config.is_file():
            continue
        if "auto_map" in json.loads(config.read_text()):
            typer.echo(
                f"tinkerd: model {parsed.name!r} ships its own Python code ({parsed.source}); "
                f"tinkerd runs it only when asked: add --trust-remote-code {parsed.name} "
                "(TINKERD_TRUST_REMOTE_CODE) if you trust its source",
                err=True,
            )
            raise typer.Exit(2)


def _check_replicas(settings: Settings) -> None:
    """Refuse bad `--replicas` specs, or replicas without Ray installed, before loading."""
    import importlib.util

    if not settings.replicas:
        return
    try:
        counts = settings.replica_counts()
    except ValueError as exc:
        typer.echo(f"tinkerd: {exc}", err=True)
        raise typer.Exit(2) from exc
    if importlib.util.find_spec("ray") is None:
        typer.echo(
            "tinkerd: --replicas runs workers on Ray, which is not installed: "
            "pip install 'tinkerd[ray]'",
            err=True,
        )
        raise typer.Exit(2)
    gangs = [c.model for c in counts.values() if c.devices > 1]
    if gangs and importlib.util.find_spec("tinkerd.engine.gang") is None:
        typer.echo(
            f"tinkerd: multi-device replicas (MODEL=NxK with K > 1, here {', '.join(gangs)}) "
            "are not available in this build (tinkerd/engine/gang.py)",
            err=True,
        )
        raise typer.Exit(2)


def _store(settings: Settings) -> "Store":
    """The server's database (the data dir is created for the default SQLite file)."""
    from tinkerd.store.store import Store

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Store(settings.resolved_database_url())


def _check_exposure(settings: Settings) -> bool:
    """Refuse (exit 2) to serve a non-loopback address with no usable key, where in
    zero-setup mode anyone who can reach the port is a user, unless --insecure; returns
    whether keys are registered (the server's mode). Runs before any model is loaded, so a
    refusal is immediate."""
    from tinkerd.api.auth import is_loopback

    with _store(settings) as store:
        keys = store.list_api_keys()
    registered = bool(keys)
    if any(k.revoked_at is None for k in keys) or is_loopback(settings.host):
        return registered
    if not settings.insecure:
        typer.echo(
            f"tinkerd: refusing to serve {settings.host}, which other machines can reach, "
            "with no unrevoked API key registered. Create a key with "
            "`tinkerd keys create --name NAME` (same --data-dir/--database-url), bind "
            "127.0.0.1, or pass --insecure to accept any tml- key.",
            err=True,
        )
        raise typer.Exit(2)
    typer.echo(
        f"tinkerd: WARNING: --insecure: serving {settings.host} with no registered API key; "
        "anyone who can reach it can use it",
        err=True,
    )
    return False


def _check_bf16(settings: Settings) -> None:
    """Refuse (exit 2) to serve bfloat16 on a CPU whose bf16 matmuls are emulated (tens to
    hundreds of times slower than float32: the server would look hung), unless
    --allow-slow-bf16. Probes the CPU in ~20 ms before any model is loaded; CUDA is not
    checked."""
    if settings.dtype != "bfloat16" or not settings.device.startswith("cpu"):
        return
    from tinkerd.model.cpu_features import bf16_support

    support = bf16_support()
    if support.native:
        return
    if not settings.allow_slow_bf16:
        typer.echo(
            "tinkerd: refusing --dtype bfloat16 on this CPU: it has no native bf16 matmul, "
            f"so training and sampling would run many times slower than float32 ({support.reason})"
            ". Serve --dtype float32 (the default), or pass --allow-slow-bf16 "
            "(TINKERD_ALLOW_SLOW_BF16=1) to serve bf16 anyway.",
            err=True,
        )
        raise typer.Exit(2)
    typer.echo(
        f"tinkerd: WARNING: --allow-slow-bf16: serving bfloat16 without native bf16 "
        f"({support.reason})",
        err=True,
    )


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="User name: keys with the same name are one user")],
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Register a new API key and print it (only its hash is stored: it is shown once)."""
    from tinkerd.api.auth import register_key

    with _store(_settings(data_dir=data_dir, database_url=database_url)) as store:
        try:
            rec, api_key = register_key(store, name)
        except ValueError as exc:
            typer.echo(f"tinkerd: {exc}", err=True)
            raise typer.Exit(1) from exc
    typer.echo(api_key)
    typer.echo(f"created key {rec.key_id} for user {rec.name!r}; it is not shown again", err=True)


@keys_app.command("list")
def keys_list(data_dir: DataDirOption = None, database_url: DatabaseUrlOption = None) -> None:
    """List registered keys (id, name, created, revoked); never the keys themselves."""
    with _store(_settings(data_dir=data_dir, database_url=database_url)) as store:
        records = store.list_api_keys()
    rows = [("ID", "NAME", "CREATED", "REVOKED")]
    for r in records:
        created = r.created_at.isoformat(timespec="seconds") if r.created_at else "-"
        revoked = r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else "-"
        rows.append((r.key_id, r.name, created, revoked))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id, from `tinkerd keys list`")],
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Revoke a key: a running server refuses it within a couple of seconds."""
    with _store(_settings(data_dir=data_dir, database_url=database_url)) as store:
        rec = store.get_api_key(key_id)
        if rec is None:
            typer.echo(f"tinkerd: no key with id {key_id!r}", err=True)
            raise typer.Exit(1)
        if not store.revoke_api_key(key_id):
            typer.echo(f"key {key_id} was already revoked")
            return
    typer.echo(f"revoked key {key_id} of user {rec.name!r}")


@app.command("status")
def status(
    url: Annotated[str, typer.Option(help="The server's base URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="TINKER_API_KEY", help="An accepted API key [env: TINKER_API_KEY]"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, for scripts")] = False,
) -> None:
    """A running server's workers: per served model, each replica's process, node, devices,
    state, runs, queue depth and memory (GET /api/v1/tinkerd/replicas)."""
    import httpx

    try:
        answer = httpx.get(
            f"{url.rstrip('/')}/api/v1/tinkerd/replicas",
            headers={"X-API-Key": api_key or "tml-status"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        typer.echo(f"tinkerd status: no server at {url}: {exc}", err=True)
        raise typer.Exit(1) from exc
    if answer.status_code != 200:
        typer.echo(f"tinkerd status: {answer.status_code} {answer.text}", err=True)
        raise typer.Exit(1)
    replicas = answer.json()["replicas"]
    if as_json:
        typer.echo(json.dumps({"url": url, "replicas": replicas}))
        return
    typer.echo(_status_table(replicas))


def _status_table(replicas: list[dict]) -> str:
    columns = ("model", "replica", "state", "pid", "node", "devices", "runs", "queue", "memory")
    rows = [
        (
            r["model"],
            str(r["replica"]),
            r["state"],
            str(r["pid"] or "-"),
            r["node"] or "-",
            r["devices"],
            str(r["runs"]),
            str(r["queue_depth"]),
            "-" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.0f} MiB",
        )
        for r in replicas
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


@app.command("prepare-model")
def prepare_model(
    model: Annotated[list[str] | None, typer.Option(help="Model name or path (repeatable)")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Load each served model once (converting the embedded model) and print its facts."""
    from tinkerd.api.app import load_served_model

    settings = _settings(data_dir=data_dir, models=model)
    for spec in settings.model_specs():
        base = load_served_model(settings, spec)
        typer.echo(json.dumps(base.info.__dict__))


@app.command("tokenizer-cache")
def tokenizer_cache(
    model: Annotated[
        list[str] | None,
        typer.Option(help="Served model name (repeatable) [default: every served model]"),
    ] = None,
    data_dir: DataDirOption = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="HF hub cache to write into [default: huggingface_hub's: HF_HUB_CACHE, "
            "else HF_HOME/hub, else ~/.cache/huggingface/hub]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Write each served model's tokenizer into the local HF hub cache, so that clients'
    `AutoTokenizer.from_pretrained(NAME)` works with HF_HUB_OFFLINE=1."""
    from tinkerd.model.tokenizer_cache import (
        default_hub_cache,
        source_for_model,
        write_tokenizer_cache,
    )

    settings = _settings(data_dir=data_dir, models=model)
    cache = (cache_dir or default_hub_cache()).resolve()
    failed = False
    for spec in settings.model_specs():
        name = spec.name
        try:
            # NAME=PATH: the directory's tokenizer, published under NAME.
            source = (
                Path(spec.source)
                if spec.name != spec.source
                else source_for_model(name, settings.data_dir)
            )
        except FileNotFoundError as exc:
            typer.echo(f"{name}: {exc}", err=True)
            failed = True
            continue
        if source is None:
            typer.echo(f"{name}: a local directory; clients load it by that path, nothing to do")
            continue
        if source.resolve().is_relative_to(cache):
            typer.echo(f"{name}: already in {cache} ({source})")
            continue
        written = write_tokenizer_cache(name, source, cache)
        state = "wrote" if written.changed else "up to date"
        typer.echo(f"{name}: {state} {written.snapshot_dir} ({', '.join(written.files)})")
    typer.echo(f"clients: HF_HUB_CACHE={cache} HF_HUB_OFFLINE=1 (or copy that folder to theirs)")
    if failed:
        raise typer.Exit(1)


@bench_app.command("engine")
def bench_engine(
    model: Annotated[str | None, typer.Option(help="Model name or path")] = None,
    data_dir: DataDirOption = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int, typer.Option(help="torch threads")] = 2,
    steps: Annotated[int, typer.Option(help="timed repetitions (best is kept)")] = 3,
    dtype: Annotated[str | None, BenchDtypeOption] = None,
    bf16_autocast: Annotated[
        bool | None,
        typer.Option(
            "--bf16-autocast/--no-bf16-autocast",
            help="bf16 autocast of the math on both sides (default: with bfloat16 weights)",
            show_default=False,
        ),
    ] = None,
    random_weights: Annotated[
        bool, typer.Option(help="random weights with the model dir's architecture")
    ] = False,
) -> None:
    """Training step vs peft, mixed-adapter batch vs per-adapter batches, sampling vs HF."""
    from tinkerd.bench.engine import EngineBenchConfig, run

    settings = _settings(data_dir=data_dir)
    known = {f.name for f in fields(EngineBenchConfig)}
    args = {
        "data_dir": settings.data_dir,
        "device": device,
        "threads": threads,
        "steps": steps,
        "random_weights": random_weights,
        "dtype": dtype,
        "autocast": bf16_autocast,
    }
    if model:
        args["model"] = model
    results = run(EngineBenchConfig(**{k: v for k, v in args.items() if k in known}))
    typer.echo(json.dumps(results))


@bench_app.command("sample")
def bench_sample(
    model: Annotated[str | None, typer.Option(help="Model name or path")] = None,
    data_dir: DataDirOption = None,
    threads: Annotated[int, typer.Option(help="torch threads")] = 2,
    tokens: Annotated[int, typer.Option(help="new tokens per sequence")] = 64,
    engine: Annotated[
        str,
        typer.Option(
            help="continuous; or eager (tinkerd's decoder without its fused kernels), "
            "transformers (its forward as the decode step) or static (the previous "
            "sampler), for (a)/(b)"
        ),
    ] = "continuous",
    server: Annotated[
        bool, typer.Option(help="run (c): concurrent SDK clients on a real server")
    ] = True,
    dtype: Annotated[str | None, BenchDtypeOption] = None,
    vllm_python: Annotated[
        Path | None,
        typer.Option(
            help="Python of a vLLM venv: (a)/(b) on vLLM too [default: .vllm-venv if built]"
        ),
    ] = None,
    vllm: Annotated[bool, typer.Option(help="run the vLLM column where a venv is found")] = True,
) -> None:
    """Sampling tokens/s and time to first token vs HF generate, vLLM and the machine's limit."""
    from tinkerd.bench.sample import SampleBenchConfig, run
    from tinkerd.engine.vllm_sampler import default_python

    if engine not in ("continuous", "eager", "transformers", "static"):
        raise typer.BadParameter("--engine must be continuous, eager, transformers or static")
    settings = _settings(data_dir=data_dir)
    if vllm and vllm_python is None:
        vllm_python = default_python(Path(__file__).resolve().parents[1])
    cfg = SampleBenchConfig(
        data_dir=settings.data_dir,
        threads=threads,
        tokens=tokens,
        engine=engine,
        server=server,
        dtype=dtype,
        vllm_python=vllm_python if vllm else None,
    )
    if model:
        cfg = SampleBenchConfig(**{**cfg.__dict__, "model": model})
    typer.echo(json.dumps(run(cfg)))


@bench_app.command("api")
def bench_api(
    model: Annotated[str | None, typer.Option(help="Model name or path")] = None,
    data_dir: DataDirOption = None,
    threads: Annotated[int, typer.Option(help="torch threads")] = 2,
    steps: Annotated[int, typer.Option(help="timed repetitions (best is kept)")] = 3,
    rounds: Annotated[int, typer.Option(help="latency round trips")] = 200,
    dtype: Annotated[str | None, BenchDtypeOption] = None,
) -> None:
    """SFT through the SDK and server vs the engine in-process; round-trip latency."""
    from tinkerd.bench.api import ApiBenchConfig, run

    settings = _settings(data_dir=data_dir)
    cfg = ApiBenchConfig(
        data_dir=settings.data_dir,
        threads=threads,
        steps=steps,
        latency_rounds=rounds,
        dtype=dtype,
    )
    if model:
        cfg = ApiBenchConfig(**{**cfg.__dict__, "model": model})
    typer.echo(json.dumps(run(cfg)))


@bench_app.command("scale")
def bench_scale(
    model: Annotated[str | None, typer.Option(help="Model name or path (default: tiny)")] = None,
    seconds: Annotated[float, typer.Option(help="load duration per configuration")] = 60.0,
    clients: Annotated[int, typer.Option(help="concurrent SDK clients")] = 16,
    replicas: Annotated[
        list[int] | None, typer.Option(help="Ray replica counts to compare (repeatable)")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads per worker")] = 1,
    dtype: Annotated[str | None, BenchDtypeOption] = None,
) -> None:
    """The multi-tenant load on 1 in-process worker vs Ray replicas: throughput, p50/p99, and
    the Ray hop's overhead per request."""
    from tinkerd.bench.scale import ScaleBenchConfig, run

    cfg = ScaleBenchConfig(
        model=model,
        seconds=seconds,
        clients=clients,
        replicas=tuple(replicas or [2]),
        threads=threads,
        dtype=dtype,
    )
    typer.echo(json.dumps(run(cfg)))


@bench_app.command("moe")
def bench_moe(
    rows: Annotated[int, typer.Option(help="rows of the training batch")] = 8,
    seq: Annotated[int, typer.Option(help="tokens per row")] = 128,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 32,
    tenants: Annotated[int, typer.Option(help="adapters in the mixed batch")] = 4,
    steps: Annotated[int, typer.Option(help="timed repetitions (best is kept)")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads")] = 2,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    experts: Annotated[int, typer.Option(help="routed experts per layer")] = 4,
    hidden_size: Annotated[int, typer.Option(help="hidden size (MoE width: half)")] = 64,
    dtype: Annotated[str | None, BenchDtypeOption] = None,
) -> None:
    """LoRA on MoE experts vs attention-only LoRA on a tiny Qwen3-MoE: tokens/s and memory."""
    from tinkerd.bench.moe import MoeBenchConfig, run

    cfg = MoeBenchConfig(
        rows=rows,
        seq=seq,
        rank=rank,
        tenants=tenants,
        steps=steps,
        threads=threads,
        device=device,
        dtype=dtype,
        experts=experts,
        hidden_size=hidden_size,
    )
    typer.echo(json.dumps(run(cfg)))


@bench_app.command("load")
def bench_load(
    seconds: Annotated[float, typer.Option(help="length of the concurrent load")] = 60.0,
    clients: Annotated[int, typer.Option(help="concurrent SDK clients, one user each")] = 16,
    train_fraction: Annotated[
        float, typer.Option(help="share of the clients that are train-heavy (rest sample)")
    ] = 0.5,
    model: Annotated[
        str | None, typer.Option(help="Model name or path [default: tiny model built in code]")
    ] = None,
    threads: Annotated[int, typer.Option(help="the server's torch threads")] = 1,
    baseline_seconds: Annotated[
        float, typer.Option(help="one client alone first, for the latency baseline (0: skip)")
    ] = 10.0,
    max_rss_growth: Annotated[
        float, typer.Option(help="fail if server RSS grows more than this % after warm-up")
    ] = 5.0,
    dtype: Annotated[str | None, BenchDtypeOption] = None,
) -> None:
    """Concurrent SDK users training and sampling against one `tinkerd serve`: per-request
    throughput and latency, failures, server RSS. Exits 1 on any failure or RSS growth."""
    from tinkerd.bench.load import LoadBenchConfig, run

    results = run(
        LoadBenchConfig(
            model=model,
            seconds=seconds,
            clients=clients,
            train_fraction=train_fraction,
            threads=threads,
            baseline_seconds=baseline_seconds,
            max_rss_growth_pct=max_rss_growth,
            dtype=dtype,
        )
    )
    typer.echo(json.dumps(results))
    if not results["ok"]:
        raise typer.Exit(1)


def _export_source(path: str, data_dir: Path | None) -> tuple[Path, "Settings"]:
    """The checkpoint directory of `path` in the data dir (exit 1 if there is none)."""
    from tinkerd.checkpoints.paths import TinkerPath
    from tinkerd.checkpoints.peft_format import checkpoint_exists

    settings = _settings(data_dir=data_dir)
    try:
        directory = TinkerPath.parse(path).storage_dir(settings.data_dir / "checkpoints")
    except ValueError as exc:
        typer.echo(f"tinkerd: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not checkpoint_exists(directory):
        typer.echo(f"tinkerd: no checkpoint {path} in {settings.data_dir}", err=True)
        raise typer.Exit(1)
    return directory, settings


@export_app.command("merged")
def export_merged_cmd(
    path: Annotated[str, typer.Argument(help="tinker://<run>/<kind>/<name>")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write (must not exist)")],
    data_dir: DataDirOption = None,
    base: Annotated[
        str | None,
        typer.Option(
            help="Base model directory or hub name [default: the checkpoint's base model, "
            "resolved like `serve --model` (NAME=PATH specs from --model / TINKERD_MODELS)]",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="NAME=PATH as for `serve` (repeatable)")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="float32 | bfloat16 | float16 [default: the base model's dtype]"),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT_DIR")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow the base model's own code")
    ] = False,
) -> None:
    """Write the base model with the adapter merged, as a Hugging Face model directory."""
    from tinkerd.checkpoints.merge import DTYPES, export_merged
    from tinkerd.checkpoints.peft_format import read_adapter_info
    from tinkerd.model.loading import resolve_model_path

    directory, settings = _export_source(path, data_dir)
    if dtype is not None and dtype not in DTYPES:
        typer.echo(f"tinkerd: --dtype must be one of {', '.join(DTYPES)}", err=True)
        raise typer.Exit(2)
    if base is None:
        base = read_adapter_info(directory).base_model
        specs = {s.name: s.source for s in _settings(models=model).model_specs()}
        base = resolve_model_path(specs.get(base, base), settings.data_dir)
    try:
        report = export_merged(
            directory,
            base,
            out_dir,
            checkpoint=path,
            dtype=dtype,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
        )
    except (FileExistsError, ValueError, OSError) as exc:
        typer.echo(f"tinkerd: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{path}: merged {len(report.merged)} targets into {base} -> {out_dir}")
    for note in report.notes:
        typer.echo(f"  note: {note}")


@export_app.command("peft")
def export_peft_cmd(
    path: Annotated[str, typer.Argument(help="tinker://<run>/<kind>/<name>")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write (must not exist)")],
    data_dir: DataDirOption = None,
    drop_lm_head: Annotated[
        bool,
        typer.Option(
            "--drop-lm-head",
            help="Leave out an lm_head (unembedding) LoRA, which stock vLLM refuses (the "
            "adapter's outputs then differ from tinkerd's)",
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT_DIR")] = False,
) -> None:
    """Write the adapter as PEFT files (for PEFT, vLLM, SGLang) with a note on using them."""
    from tinkerd.checkpoints.merge import export_peft

    directory, _ = _export_source(path, data_dir)
    try:
        report = export_peft(
            directory, out_dir, checkpoint=path, drop_lm_head=drop_lm_head, overwrite=overwrite
        )
    except (FileExistsError, ValueError, OSError) as exc:
        typer.echo(f"tinkerd: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{path}: PEFT adapter ({len(report.merged)} targets) -> {out_dir}")
    for note in report.notes:
        typer.echo(f"  note: {note}")


if __name__ == "__main__":
    app()
