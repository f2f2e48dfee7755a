"""The `streamprune` command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from streamprune import storage
from streamprune.cli.options import add_settings, settings_from_args
from streamprune.errors import DamagedRunError, SettingsError, StreamPruneError
from streamprune.formats.rundir import RunDir
from streamprune.settings import LABEL_HELP, IndexSettings, RecordSettings, ReduceSettings, ReportSettings, described
from streamprune.stages.ray_output import routed_to, tail
from streamprune.stages.summaries import index_summary, record_line, reduce_line

DESCRIPTION = """Prune WebDataset training sets while they stream: index shards, record a proxy's
per-sample statistics on Ray, reduce them to a DUAL+Beta keep-list, apply it at load time."""


def cmd_index(args) -> None:
    settings = settings_from_args(IndexSettings, args)  # refused here, before Ray starts
    from streamprune.stages.index import index, refuse_broken

    idx = index(args.shards, args.out, settings=settings, address=args.address, progress=not args.quiet)
    print(index_summary(idx))
    refuse_broken(idx, settings)
    if args.label:
        from streamprune.stages.label_scan import build_classes

        classes = build_classes(args.out, args.label, address=args.address, progress=not args.quiet, shards=args.shards)
        kind = "class names" if classes.names else "integer classes"
        print(
            f"labels ({args.label}): {classes.num_classes:,} {kind}, written to {args.out}/classes.json "
            f"(record uses {args.label} without --label)"
        )


def cmd_make_shards(args) -> None:
    from streamprune.demo.datasets import fashion_mnist_shards

    paths, source = fashion_mnist_shards(
        args.out,
        split=args.split,
        data_dir=args.data_dir,
        n_shards=args.shards,
        uneven=args.uneven,
        limit=args.limit,
        image_format=args.format,
        seed=args.seed,
    )
    print(f"wrote {len(paths)} shards of Fashion-MNIST {args.split} from {source} to {args.out}")


def _shards_option(s: argparse.ArgumentParser) -> None:
    """`--shards SPEC` of the commands that read the indexed shards."""
    s.add_argument(
        "--shards",
        action="append",
        metavar="SPEC",
        help="the shards you indexed (paths, braces, globs, :: lists, file://, pipe:, fsspec URLs; "
        "repeatable), matched to the index by shard name and read from these URLs; needed when they "
        "are pipe: commands or remote URLs (default: the index root plus each shard's name)",
    )


def demo_caps(data_dir: str | None, samples: int, test_samples: int) -> list[str]:
    """A line for each of `--samples` and `--test-samples` that asks more images than the data has."""
    from streamprune.demo.datasets import fashion_mnist_dir, load_fashion_mnist

    notes = []
    for flag, split, asked in (("--samples", "train", samples), ("--test-samples", "test", test_samples)):
        have = len(load_fashion_mnist(split, data_dir)[1])
        if asked > have:
            notes.append(
                f"{flag} {asked:,}: {fashion_mnist_dir(data_dir)} has {have:,} {split} images, all of them are used"
            )
    return notes


def demo_config(
    out: Path, samples: int, epochs: int, ratio: float, train_epochs: int, seeds: int, address: str | None
) -> dict:
    """The demo's `streamprune run` config (paths relative to OUT, where it is written)."""
    return {
        "shards": "shards/train-*.tar",
        "out": "run",
        "address": address,
        "record": {"epochs": epochs, "schedule_epochs": 3 * epochs, "num_classes": 10},
        "reduce": {"ratio": ratio, "method": "dual-beta", "window": min(10, epochs), "balance": "classes"},
        "evaluate": {
            "test_shards": "test-shards/test-*.tar",
            "epochs": train_epochs,
            "budget": "steps",
            "seeds": seeds,
            "baseline": "random",
            "full": True,
        },
    }


def cmd_demo(args) -> None:
    import yaml

    from streamprune.config import load_config
    from streamprune.demo.datasets import fashion_mnist_classes, fashion_mnist_shards
    from streamprune.stages.pipeline import format_table, run_pipeline

    out = Path(args.out)
    t0 = time.perf_counter()
    paths, source = fashion_mnist_shards(
        out / "shards", data_dir=args.data_dir, uneven=True, limit=args.samples, progress=not args.quiet
    )
    test, _ = fashion_mnist_shards(
        out / "test-shards", split="test", data_dir=args.data_dir, limit=args.test_samples, progress=not args.quiet
    )
    print(
        f"shards: {len(paths)} uneven training shards and {len(test)} test shards of Fashion-MNIST from {source} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    for note in demo_caps(args.data_dir, args.samples, args.test_samples):
        print(note)
    config = out / "streamprune.yaml"
    fields = demo_config(out, args.samples, args.epochs, args.ratio, args.train_epochs, args.seeds, args.address)
    config.write_text(
        "# written by `streamprune demo`; rerun with `streamprune run` to resume or change it\n"
        + yaml.safe_dump(fields, sort_keys=False)
    )
    run = RunDir(out / fields["out"])
    if not os.path.exists(run.stats):  # a demo recorded before with numbered classes resumes as it was
        fashion_mnist_classes().save(run.root)  # RUN/classes.json: the report names the classes
    result = run_pipeline(load_config(config), progress=not args.quiet)
    print("\n" + format_table(result))
    print(
        f"\nreport: {result.report}\nconfig: {config} (rerun: streamprune run {config})\n"
        f"apply: PrunedWebDataset('{out / 'shards'}/train-*.tar', keep='{RunDir(result.run).keep}', shardshuffle=100)"
    )


def cmd_run(args) -> None:
    from streamprune.config import load_config
    from streamprune.stages.pipeline import format_table, run_pipeline

    result = run_pipeline(load_config(args.config), progress=not args.quiet, restart=args.restart)
    print("\n" + format_table(result))
    if result.report:
        print(f"report: {result.report}")


def cmd_init_config(args) -> None:
    from streamprune.config import EXAMPLE

    path = Path(args.path)
    if path.exists() and not args.force:
        raise FileExistsError(f"{str(path)!r} exists; pass --force to overwrite it")
    path.write_text(EXAMPLE)
    print(f"wrote {path}: edit `shards` (and anything else), then run `streamprune run {path}`")


def cmd_report(args) -> None:
    from streamprune.stages.report import build_report

    page = build_report(args.run, args.out, max_rows=args.max_rows, progress=not args.quiet, shards=args.shards)
    print(f"report: {page}")


def cmd_inspect(args) -> None:
    import json

    from streamprune.inspection.run_state import format_state, run_state

    state = run_state(args.run)
    report = None
    if args.verify:
        from streamprune.inspection.verify import format_report, verify_run

        report = verify_run(args.run, progress=not args.quiet)
        state["verify"] = report
    print(json.dumps(state, indent=1) if args.json else format_state(state))
    if report is not None and not args.json:
        print(format_report(report))
    if report is not None and report["damaged"]:  # exit status 2
        raise DamagedRunError(f"run {args.run} is damaged: {len(report['problems'])} problems (listed above)")


def cmd_record(args) -> None:
    settings = settings_from_args(RecordSettings, args)  # refused here, before Ray starts
    from streamprune.stages.record import record

    summary = record(
        args.run,
        settings=settings,
        address=args.address,
        progress=not args.quiet,
        shards=args.shards,
        restart=args.restart,
    )
    print(record_line(summary))


def cmd_reduce(args) -> None:
    settings = settings_from_args(ReduceSettings, args)
    from streamprune.stages.reduce import reduce

    keep = reduce(
        args.run,
        settings=settings,
        out=args.out,
        address=args.address,
        workers=args.workers,
        block_rows=args.block_rows,
        progress=not args.quiet,
    )
    print(reduce_line(keep, args.out or RunDir(args.run).keep))


def cmd_reshard(args) -> None:
    from streamprune.stages.reshard import reshard

    paths = reshard(
        args.run,
        args.out,
        args.shard_size,
        keep=args.keep,
        prefix=args.prefix,
        address=args.address,
        progress=not args.quiet,
        shards=args.shards,
    )
    print(f"reshard: {len(paths)} shards in {args.out} ({args.prefix}-000000.tar ...)")


def cmd_export(args) -> None:
    from streamprune.stages.export import export

    done = export(
        args.keep,
        args.out,
        format=args.format,
        what=args.what,
        run=args.run,
        score=args.score,
        force=args.force,
        group_rows=args.group_rows,
    )
    print(f"export: {done.rows:,} samples ({done.what}) as {done.format} to {done.out}")


def _at_least_1(text: str) -> int:
    """An option's integer >= 1 (refused by the parser, naming the option, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}")
    return value


class _Help(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; "(default: X)" added where a default means something and the help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _address_option(s: argparse.ArgumentParser) -> None:
    """`--address`, as the config file's `address` field describes it."""
    from streamprune.config import RunSettings

    field = next(f for f in dataclasses.fields(RunSettings) if f.name == "address")
    s.add_argument("--address", help=described(field, "default"))


class _Commands:
    """The subcommands' parsers: each with the common options, its help as description and an example."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.sub = parser.add_subparsers(dest="command", required=True)
        self.common = argparse.ArgumentParser(add_help=False)
        self.common.add_argument("--quiet", action="store_true", help="no progress bars (for logs of batch jobs)")
        self.common.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def __call__(self, name: str, help_: str, example: str, fn) -> argparse.ArgumentParser:
        s = self.sub.add_parser(
            name,
            help=help_,
            description=help_,
            parents=[self.common],
            formatter_class=_Help,
            epilog=f"example:\n  {example}",
        )
        s.set_defaults(fn=fn)
        return s


def build_parser() -> argparse.ArgumentParser:
    """`streamprune` and its subcommands; the stage commands' settings options come from the
    settings classes (`cli.options.add_settings`), the rest are written here."""
    from streamprune import __version__

    p = argparse.ArgumentParser(
        prog="streamprune",
        description=DESCRIPTION,
        formatter_class=_Help,
        epilog="Start with `streamprune demo`; `streamprune COMMAND --help` for each command.",
    )
    p.add_argument("--version", action="version", version=f"streamprune {__version__}")
    command = _Commands(p)
    _pipeline_commands(command)
    _stage_commands(command)
    _output_commands(command)
    _tool_commands(command)
    return p


def _pipeline_commands(command: _Commands) -> None:
    """demo, run, init-config: the whole pipeline."""
    s = command(
        "demo",
        "the whole job offline on real Fashion-MNIST: shards, index, record, reduce, "
        "fresh models on the kept and a random subset, report",
        "streamprune demo --out /tmp/demo",
        cmd_demo,
    )
    s.add_argument("--out", default="streamprune-demo", help="output directory")
    s.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: found or bundled)")
    s.add_argument("--samples", type=int, default=6000, help="training images to use")
    s.add_argument("--test-samples", type=int, default=2000, help="test images to evaluate on")
    s.add_argument("--epochs", type=int, default=10, help="proxy epochs to record (T)")
    s.add_argument("--ratio", type=float, default=0.5, help="pruning ratio")
    s.add_argument(
        "--train-epochs",
        type=int,
        default=10,
        help="epochs of the full-data fresh model; each subset gets as many SGD steps",
    )
    s.add_argument("--seeds", type=int, default=3, help="fresh models per subset (keep-list and training seeds)")
    _address_option(s)

    s = command(
        "run",
        "every stage from one config file (YAML or TOML), resumable",
        "streamprune init-config streamprune.yaml && streamprune run streamprune.yaml",
        cmd_run,
    )
    s.add_argument("config", help="config file (.yaml, .yml or .toml)")
    s.add_argument(
        "--restart",
        action="store_true",
        help="record again from epoch 0 with the config's record settings (as `record --restart`: the "
        "statistics and what was drawn from them are cleared; the index and classes.json stay)",
    )

    s = command(
        "init-config", "write a commented example config", "streamprune init-config streamprune.yaml", cmd_init_config
    )
    s.add_argument("path", nargs="?", default="streamprune.yaml")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")


def _stage_commands(command: _Commands) -> None:
    """index, record, reduce: each stage's settings, plus where it reads and writes."""
    s = command(
        "index",
        "scan shards in parallel and write RUN/index",
        "streamprune index 'data/train-{000000..000099}.tar' --out run",
        cmd_index,
    )
    s.add_argument("shards", nargs="+", help="shard URLs: paths, braces, globs, file://, pipe:, fsspec URLs")
    s.add_argument("--out", required=True, help="run directory (the index goes to OUT/index)")
    add_settings(s, IndexSettings)
    s.add_argument(
        "--label",
        help="also count every sample's label and write the class list RUN/classes.json with the spec, "
        "which `record` then uses without --label (default: no labels counted); " + LABEL_HELP.split("; ", 1)[0],
    )
    _address_option(s)

    s = command(
        "record",
        "train the proxy on Ray and record per-sample statistics",
        "streamprune record run --epochs 10 --workers 2",
        cmd_record,
    )
    s.add_argument("run", help="run directory holding RUN/index")
    _shards_option(s)
    add_settings(s, RecordSettings, required=["epochs"])
    _address_option(s)
    s.add_argument(
        "--restart",
        action="store_true",
        help="first clear what an earlier record of RUN wrote (statistics, checkpoints, skipped-sample log, "
        "and the scores and keep-lists drawn from them; the index and classes.json stay), then record from "
        "epoch 0 with these settings",
    )

    s = command("reduce", "score samples and write the keep-list", "streamprune reduce run --ratio 0.7", cmd_reduce)
    s.add_argument("run", help="run directory with RUN/index and RUN/stats.zarr")
    add_settings(s, ReduceSettings, required=["ratio"])
    s.add_argument("--workers", type=int, help="reducer tasks in flight (default: the cluster's CPUs)")
    s.add_argument("--block-rows", type=int, help="rows per task (rounded to whole store chunks; default 262144)")
    s.add_argument("--out", help="keep-list directory (default RUN/keep)")
    _address_option(s)


def _output_commands(command: _Commands) -> None:
    """reshard, export, report: what is made of a keep-list."""
    s = command(
        "reshard",
        "write the kept samples as new shards (Ray tasks)",
        "streamprune reshard run --out pruned-shards --shard-size 10000",
        cmd_reshard,
    )
    s.add_argument("run", help="run directory with RUN/index and RUN/keep")
    _shards_option(s)
    s.add_argument("--out", required=True, help="output directory for the new shards")
    s.add_argument("--shard-size", type=_at_least_1, help="samples per output shard (default: the input's mean)")
    s.add_argument("--keep", help="keep-list directory (default RUN/keep)")
    s.add_argument("--prefix", default="pruned", help="output shard names PREFIX-NNNNNN.tar")
    _address_option(s)

    s = command(
        "export",
        "write a keep-list's kept or removed samples as Parquet, a DataComp subset or identities",
        "streamprune export run/keep --format parquet --what remove --out remove.parquet",
        cmd_export,
    )
    s.add_argument("keep", help="keep-list directory or URL (RUN/keep)")
    s.add_argument("--out", required=True, help="output file path or URL")
    s.add_argument(
        "--format",
        default="parquet",
        choices=["parquet", "datacomp", "ids"],
        help="parquet: id, shard, key, score, kept per sample; datacomp: sorted u8,u8 .npy; ids: a uid per line",
    )
    s.add_argument(
        "--what",
        default="keep",
        choices=["keep", "remove", "all"],
        help="the kept samples, the index's samples not kept, or all (Parquet's kept column tells)",
    )
    s.add_argument("--run", help="run directory with the index and scores (default: the keep-list's parent)")
    s.add_argument("--score", help="score in Parquet's score column (default: the list's method's, else dual)")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument(
        "--group-rows", type=_at_least_1, help="Parquet rows per row group, what memory holds at once (default 524288)"
    )

    s = command(
        "report",
        "an HTML page with PNGs: scores, Beta weights, kept fractions, image grids, curves",
        "streamprune report run",
        cmd_report,
    )
    s.add_argument("run", help="run directory with RUN/keep and RUN/scores.zarr")
    _shards_option(s)
    s.add_argument("--out", help="output folder (default RUN/report)")
    add_settings(s, ReportSettings)


def _tool_commands(command: _Commands) -> None:
    """inspect, make-shards."""
    s = command(
        "inspect", "the state of each stage, sizes, configuration, fingerprint", "streamprune inspect run", cmd_inspect
    )
    s.add_argument("run", help="run directory")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument(
        "--verify",
        action="store_true",
        help="also read every chunk and file of the run and check it against the index: one line per "
        "damaged file or chunk, exit status 2 when anything is damaged",
    )

    s = command(
        "make-shards",
        "write Fashion-MNIST as WebDataset shards",
        "streamprune make-shards --out data --uneven",
        cmd_make_shards,
    )
    s.add_argument("--out", required=True)
    s.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: found or bundled)")
    s.add_argument("--split", default="train", choices=["train", "test"])
    s.add_argument("--shards", type=int, help="number of shards (default: one per ~1000 samples)")
    s.add_argument("--uneven", action="store_true", help="deliberately uneven shard sizes")
    s.add_argument("--format", default="png", choices=["png", "npy"])
    s.add_argument("--limit", type=int, help="only the first N samples")
    s.add_argument("--seed", type=int, default=0)


# exit 2: streamprune's own errors, and files missing, unreadable or a full disk (each names the file)
USER_ERRORS = (StreamPruneError, OSError)
FULL_INSTALL = {"ray", "zarr", "scipy", "PIL", "matplotlib", "pyarrow"}  # the `all` extra's modules


def _missing_extra(exc: BaseException, command: str) -> SettingsError | None:
    """A module of the `all` extra missing (a plain `pip install streamprune`, the loader's core):
    a user's error that says what to install."""
    if not isinstance(exc, ModuleNotFoundError) or (exc.name or "").split(".")[0] not in FULL_INSTALL:
        return None
    return SettingsError(
        f"`streamprune {command}` needs the full install (no module {exc.name!r}): "
        "pip install 'streamprune[all]'; the plain install only applies keep-lists"
    )


def _reason(exc: BaseException) -> str:
    """The whole message (every line of it): of a Ray task error, its original's, without the remote traceback."""
    while (cause := getattr(exc, "cause", None)) is not None:  # a Ray task error's original
        exc = cause
    lines = [line.rstrip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1].strip() if any(line.startswith("Traceback") for line in lines) else "\n".join(lines)


class _Interrupt:
    """SIGINT while a command runs: raises KeyboardInterrupt, as Python's own handler does, and
    remembers it, so that an error Ray raises instead (a task or actor that died of the same
    Ctrl-C) still reads as the interrupt."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: object) -> None:
        self.received = True
        raise KeyboardInterrupt

    def caused(self, exc: BaseException) -> bool:
        """Whether `exc` comes of an interrupt: SIGINT was received, or a KeyboardInterrupt is in
        its chain (causes, contexts, Ray's `cause`, Ray Train's controller and worker failures)."""
        stack: list[BaseException | None] = [exc]
        seen: set[int] = set()
        while stack and not self.received:
            e = stack.pop()
            if e is None or id(e) in seen:
                continue
            if isinstance(e, KeyboardInterrupt):
                return True
            seen.add(id(e))
            stack += [
                e.__cause__,
                e.__context__,
                getattr(e, "cause", None),
                getattr(e, "controller_failure", None),
                *getattr(e, "worker_failures", {}).values(),
            ]
        return self.received


def _log_to_stderr(quiet: bool) -> None:
    """The library's `logging` records (per-epoch lines, ...) on stderr, plainly; none with --quiet."""
    logger = logging.getLogger("streamprune")
    if not any(h.get_name() == "streamprune-cli" for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.set_name("streamprune-cli")
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _exit_now(status: int) -> None:
    """End the `streamprune` process with `status` now, after shutting Ray down if it joined Ray:
    a thread still waiting on Ray (`record`'s trainer) would otherwise end it with status 1 while
    Python exits, and a second Ctrl-C must not cut the shutdown short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    finally:
        os._exit(status)


def _ray_log(args: argparse.Namespace) -> str:
    """Where the command's Ray output goes: RUN/logs/ray.log of a local run directory, else (an
    object-store run, `run`, `demo`) a local temporary file, named when the command fails."""
    run = args.out if args.command == "index" else getattr(args, "run", None)
    if run is not None and not storage.is_url(run):
        return RunDir(run).ray_log
    return os.path.join(tempfile.gettempdir(), f"streamprune-{args.command}-{os.getpid()}-ray.log")


def _run(args: argparse.Namespace, own_process: bool) -> None:
    """The command; after it succeeds, the `streamprune` process itself shuts Ray down at once, so
    that Ray's last output (its actors ending) still goes to the Ray log, not the terminal."""
    args.fn(args)
    ray = sys.modules.get("ray")
    if own_process and ray is not None and ray.is_initialized():
        ray.shutdown()


def _show_ray_log(path: str) -> None:
    """The last lines of the command's Ray output, on stderr, after an unexpected error."""
    lines = tail(path)
    if lines:
        print(f"streamprune: the last lines of Ray's output ({path}):", file=sys.stderr)
        print("\n".join(f"  {line}" for line in lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command (`argv`; None: the process's own arguments): exit status 0, 2 for a user's
    error (settings, inputs, files), 1 for any other error, 130 when interrupted; `--debug` adds
    the traceback and changes no status."""
    args = build_parser().parse_args(argv)
    _log_to_stderr(getattr(args, "quiet", False))
    interrupt = _Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt)
    ray_log = _ray_log(args)
    try:
        with routed_to(ray_log):
            _run(args, own_process=argv is None)
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, Exception)):  # SystemExit and the like
            raise
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, KeyboardInterrupt) or interrupt.caused(exc):
            print("streamprune: interrupted; rerun the same command to finish what is missing", file=sys.stderr)
            if argv is None:  # the `streamprune` process itself
                _exit_now(130)
            return 130
        exc = _missing_extra(exc, args.command) or exc
        user = isinstance(exc, USER_ERRORS)
        print(
            f"streamprune: error: {_reason(exc)}"
            + ("" if user or args.debug else f" ({type(exc).__name__}; --debug shows the traceback)"),
            file=sys.stderr,
        )
        if not user:
            _show_ray_log(ray_log)
        return 2 if user else 1
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
