"""The `tinkerd` command line."""

import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from tinkerd.config import Settings

app = typer.Typer(help="tinkerd: self-hosted server for the Tinker fine-tuning API.")
bench_app = typer.Typer(help="Benchmarks (each prints a JSON line of figures last).")
app.add_typer(bench_app, name="bench")

DataDirOption = Annotated[
    Path | None, typer.Option(help="Data directory [env: TINKERD_DATA_DIR]", show_default=False)
]


def _settings(**overrides: object) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env: TINKERD_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env: TINKERD_PORT]")] = None,
    data_dir: DataDirOption = None,
    model: Annotated[
        list[str] | None,
        typer.Option(help="Base model name or path, repeatable [env: TINKERD_MODELS]"),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL [env: TINKERD_DATABASE_URL]")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32 | bfloat16 [env: TINKERD_DTYPE]")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda [env: TINKERD_DEVICE]")] = None,
) -> None:
    """Run the Tinker-compatible HTTP server."""
    import logging
    import signal
    import sys

    import uvicorn

    from tinkerd.api.app import create_app

    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        models=model,
        database_url=database_url,
        dtype=dtype,
        device=device,
    )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    url = f"http://{settings.host}:{settings.port}"
    typer.echo(f"tinkerd: serving {', '.join(settings.models)} at {url}")
    typer.echo(f"  export TINKER_BASE_URL={url}")
    typer.echo("  export TINKER_API_KEY=tml-local   # any key starting with tml-")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal under the handler
    # that was in place before it started: make that one a clean exit (status 0).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


@app.command("prepare-model")
def prepare_model(
    model: Annotated[list[str] | None, typer.Option(help="Model name or path (repeatable)")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Load each served model once (converting the embedded model) and print its facts."""
    from tinkerd.model.loading import load_base_model

    settings = _settings(data_dir=data_dir, models=model)
    for name in settings.models:
        base = load_base_model(
            name, data_dir=settings.data_dir, dtype=settings.dtype, device=settings.device
        )
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
    for name in settings.models:
        try:
            source = source_for_model(name, settings.data_dir)
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
    dtype: Annotated[str, typer.Option(help="base weights: bfloat16 or float32")] = "bfloat16",
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
    }
    if model:
        args["model"] = model
    results = run(EngineBenchConfig(**{k: v for k, v in args.items() if k in known}))
    typer.echo(json.dumps(results))


@bench_app.command("api")
def bench_api(
    model: Annotated[str | None, typer.Option(help="Model name or path")] = None,
    data_dir: DataDirOption = None,
    threads: Annotated[int, typer.Option(help="torch threads")] = 2,
    steps: Annotated[int, typer.Option(help="timed repetitions (best is kept)")] = 3,
    rounds: Annotated[int, typer.Option(help="latency round trips")] = 200,
) -> None:
    """SFT through the SDK and server vs the engine in-process; round-trip latency."""
    from tinkerd.bench.api import ApiBenchConfig, run

    settings = _settings(data_dir=data_dir)
    cfg = ApiBenchConfig(
        data_dir=settings.data_dir, threads=threads, steps=steps, latency_rounds=rounds
    )
    if model:
        cfg = ApiBenchConfig(**{**cfg.__dict__, "model": model})
    typer.echo(json.dumps(run(cfg)))


if __name__ == "__main__":
    app()
