"""The command line of every script in ``experiments/``: flags, start-up, errors, outputs.

The only module that knows argparse and flag spellings. Each script is a
:class:`Command` run by the one :func:`main`:

    experiments/mnist.py, har.py   experiment_main(dataset)   ensemble_fl.experiment.run
    experiments/sweep.py           sweep_main()               ensemble_fl.experiment.run_sweep
    experiments/attack.py          attack_main()              ensemble_fl.attack_eval.run

:func:`main`

1. builds the config from the flags. Every field of the config class
   (:mod:`ensemble_fl.config`) is a flag, its name with dashes
   (``global_iters`` is ``--global-iters``) except ``num_models``, the
   paper's ``--N``; ``--preset`` gives every field no flag sets;
2. reports a bad flag, an impossible setting or missing data as one
   ``error: ...`` line on stderr, naming the flag, with exit status 2, before
   any training;
3. joins the multi-process runtime (``--distributed``; JAX's own
   ``jax.distributed``) when asked, before any JAX computation;
4. runs the command; Ctrl-C ends it with exit status 130;
5. on process 0 only, writes the outputs to ``--out`` (default
   ``results/<name>-<timestamp>/``) and prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from ensemble_fl import attack_eval
from ensemble_fl import distributed
from ensemble_fl import experiment
from ensemble_fl import progress as progress_lib
from ensemble_fl import results
from ensemble_fl.checkpoint import CheckpointError
from ensemble_fl.config import (DATASETS, PRESET_NAMES, AttackEvalConfig, ConfigError,
                                ExperimentConfig, preset_values)

# Flags spelled other than their field's name with dashes.
FLAG_SPELLINGS = {"num_models": "N"}


def flag_name(field: str) -> str:
  """The flag of config field ``field``: ``global_iters`` -> ``--global-iters``."""
  return "--" + FLAG_SPELLINGS.get(field, field.replace("_", "-"))


class ArgumentParser(argparse.ArgumentParser):
  """argparse that reports a bad flag as one ``error: ...`` line, exit status 2."""

  def error(self, message: str):
    self.exit(2, f"error: {message}\n")


# ---------------------------------------------------------------------------
# Flags from config fields.
# ---------------------------------------------------------------------------


def _list_of(kind: type) -> Callable[[str], tuple]:
  """Parses ``'1,4,8'`` (or ``'1 4 8'``) into a tuple of ``kind``."""
  def parse(text: str) -> tuple:
    try:
      return tuple(kind(v) for v in text.replace(",", " ").split())
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected comma-separated {kind.__name__} values, got {text!r}") from None
  return parse


def _show(value: Any) -> str:
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_config_flags(parser: argparse.ArgumentParser, cls: type, dataset: str) -> dict[str, str]:
  """Adds a flag for every field of ``cls`` that applies to ``dataset``.

  Every flag defaults to None (the preset decides); the help shows the
  presets' values.

  Returns:
    ``{field: flag}`` of the flags added.
  """
  hints = typing.get_type_hints(cls)
  presets = {name: preset_values(cls, dataset, name) for name in PRESET_NAMES}
  group = parser.add_argument_group("settings (override the preset)")
  flags = {}
  for field in dataclasses.fields(cls):
    if field.name == "dataset" or field.name in DATASETS[dataset].unused_fields:
      continue
    kind = hints[field.name]
    if isinstance(kind, types.UnionType):  # X | None
      kind = next(a for a in typing.get_args(kind) if a is not type(None))
    shown = {name: values.get(field.name, field.default) for name, values in presets.items()}
    help_text = field.metadata["help"]
    if not (shown["paper"] in (None, (), False) and shown["cpu"] == shown["paper"]):
      help_text += f" (paper: {_show(shown['paper'])}"
      if shown["cpu"] != shown["paper"]:
        help_text += f"; cpu preset: {_show(shown['cpu'])}"
      help_text += ")"
    kwargs: dict[str, Any] = dict(dest=field.name, default=None, help=help_text)
    if kind is bool:
      kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
      kwargs.update(type=_list_of(typing.get_args(kind)[0]), metavar="A,B,...")
    else:
      kwargs.update(type=kind, metavar=flag_name(field.name)[2:].upper().replace("-", "_"))
    if "choices" in field.metadata:
      kwargs["choices"] = field.metadata["choices"]
    flags[field.name] = flag_name(field.name)
    group.add_argument(flags[field.name], **kwargs)
  return flags


def config_from_args(cls: type, args: argparse.Namespace, dataset: str,
                     defaults: dict[str, Any] | None = None):
  """The preset ``args.preset``, then ``defaults``, then every flag given: one
  config, validated once.

  Raises:
    ConfigError: the combination is invalid.
  """
  given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
           if getattr(args, f.name, None) is not None}
  return cls(**{**preset_values(cls, dataset, args.preset), **(defaults or {}), **given})


# ---------------------------------------------------------------------------
# Multi-process runs.
# ---------------------------------------------------------------------------


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  """Flags of a multi-process run on JAX's own runtime (``jax.distributed``)."""
  g = parser.add_argument_group(
      "multi-process (jax.distributed)",
      "Every process runs the same command; the model axis is sharded over the devices of all "
      "processes, and process 0 alone writes results.")
  g.add_argument("--distributed", action="store_true",
                 help="join a multi-process JAX runtime; without the three flags below JAX "
                      "detects SLURM, Cloud TPU, Open MPI or Kubernetes (also: "
                      "ENSEMBLE_FL_DISTRIBUTED=1)")
  g.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
  g.add_argument("--num-processes", dest="num_processes", type=int,
                 help="number of processes (with --distributed)")
  g.add_argument("--process-id", dest="process_id", type=int,
                 help="this process's index in [0, num-processes) (with --distributed)")
  g.add_argument("--local-devices", dest="local_devices", type=int,
                 help="CPU only: how many CPU devices this process exposes (default 1); lets "
                      "one machine test a multi-device or multi-process run")


def start_runtime(args: argparse.Namespace) -> bool:
  """Applies the multi-process flags before any JAX computation.

  Returns:
    True when this process writes results (always on a single process).

  Raises:
    ValueError: an explicit flag without ``--distributed``, or bad values.
  """
  explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
              "--process-id": args.process_id}
  wanted = args.distributed or distributed.env_flag_distributed()
  given = [flag for flag, value in explicit.items() if value is not None]
  if given and not wanted:
    raise ValueError(f"{', '.join(given)} need(s) --distributed")
  if args.local_devices is not None and args.local_devices < 1:
    raise ValueError(f"--local-devices must be >= 1, got {args.local_devices}")
  if wanted:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           local_device_count=args.local_devices)
  elif args.local_devices is not None:
    jax.config.update("jax_num_cpu_devices", args.local_devices)
  return distributed.is_main_process()


# ---------------------------------------------------------------------------
# Commands and the one main.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Context:
  """What a command's run and write phases get from :func:`main`.

  Attributes:
    args: the parsed flags; dataset: the data set.
    out_dir: the output folder (not created yet).
    checkpoint_dir: ``out_dir/checkpoint`` with ``--checkpoint``, else None.
    main_process: this process writes the outputs.
    log: one line per phase (stderr; silent on other processes).
    progress_factory: progress bars (None on other processes).
    timings: phases done before the run (loading the data).
    start: ``time.perf_counter()`` when the command started.
  """

  args: argparse.Namespace
  dataset: str
  out_dir: Path
  checkpoint_dir: Path | None
  main_process: bool
  log: Callable[[str], None]
  progress_factory: Any
  timings: dict[str, float]
  start: float


@dataclasses.dataclass(frozen=True)
class Command:
  """One script.

  Attributes:
    prog, description: for ``--help``.
    config_class: the config its flags build.
    dataset: the fixed data set, or None for a ``--dataset`` flag.
    default_dataset: with a ``--dataset`` flag: its default (None: required).
    default_preset: the ``--preset`` default.
    out_name: ``out_name(args, dataset)``: the default output folder's name.
    checkpoint: whether it has ``--checkpoint``.
    add_flags: adds its own flags (beyond the config's).
    defaults: ``defaults(args, dataset)``: field values between the preset
      and the flags.
    load: ``load(cfg, args, timings) -> job``: its own checks and the data
      (a ValueError or FileNotFoundError here is the user's: one line).
    run: ``run(job, context) -> result`` (an error here is a bug and keeps
      its traceback, except a checkpoint or config mismatch).
    write: ``write(result, context) -> exit status``, on process 0 only.
  """

  prog: str
  description: str
  config_class: type
  dataset: str | None
  default_dataset: str | None
  default_preset: str
  out_name: Callable[[argparse.Namespace, str], str]
  checkpoint: bool
  load: Callable[..., Any]
  run: Callable[[Any, Context], Any]
  write: Callable[[Any, Context], int]
  add_flags: Callable[[argparse.ArgumentParser, str], None] | None = None
  defaults: Callable[[argparse.Namespace, str], dict[str, Any]] | None = None


def default_out_dir(name: str) -> Path:
  return Path("results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _stderr_log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def make_parser(command: Command, dataset: str) -> tuple[ArgumentParser, dict[str, str]]:
  """``command``'s parser for ``dataset``, and ``{field: flag}`` of its config flags."""
  parser = ArgumentParser(prog=command.prog, description=command.description)
  if command.dataset is None:
    parser.add_argument("--dataset", choices=tuple(DATASETS), default=command.default_dataset,
                        required=command.default_dataset is None,
                        help="data set" + (f" (default: {command.default_dataset})"
                                           if command.default_dataset else ""))
  parser.add_argument("--preset", choices=PRESET_NAMES, default=command.default_preset,
                      help=f"base settings that the other flags override "
                           f"(default: {command.default_preset})")
  if command.add_flags is not None:
    command.add_flags(parser, dataset)
  flags = add_config_flags(parser, command.config_class, dataset)
  parser.add_argument("--out", type=Path,
                      help="output folder (default: results/<name>-<timestamp>)")
  if command.checkpoint:
    parser.add_argument("--checkpoint", action="store_true",
                        help="store finished chunks of models in OUT/checkpoint/; rerunning "
                             "the same command with the same --out resumes from them")
  add_distributed_flags(parser)
  return parser, flags


def _dataset_of(command: Command, argv: Sequence[str]) -> str:
  """The data set the flags are for (the full parser reports a bad ``--dataset``)."""
  if command.dataset is not None:
    return command.dataset
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--dataset")
  given = pre.parse_known_args(argv)[0].dataset
  return given if given in DATASETS else command.default_dataset or next(iter(DATASETS))


def _one_line(e: BaseException, flags: dict[str, str]) -> str:
  if isinstance(e, ConfigError):
    return e.describe(lambda field: flags.get(field, field))
  return " ".join(str(e).split()) or type(e).__name__


def main(command: Command, argv: Sequence[str] | None = None) -> int:
  """Runs ``command`` with the flags ``argv`` (default: ``sys.argv[1:]``).

  Returns:
    The exit status: 0 done, 2 a bad flag, setting or data (one ``error:``
    line), 130 interrupted; a command may return others (the attack check:
    1 when it finds a violation).
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  start = time.perf_counter()
  dataset = _dataset_of(command, argv)
  parser, flags = make_parser(command, dataset)
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help, or a bad flag already reported
    return e.code if isinstance(e.code, int) else 2
  dataset = args.dataset if command.dataset is None else command.dataset
  checkpointing = command.checkpoint and args.checkpoint
  out_dir = args.out or default_out_dir(command.out_name(args, dataset))

  def fail(e: BaseException) -> int:
    print(f"error: {_one_line(e, flags)}", file=sys.stderr)
    return 2

  timings: dict[str, float] = {}
  try:
    cfg = config_from_args(command.config_class, args, dataset,
                           command.defaults(args, dataset) if command.defaults else None)
    if checkpointing and args.out is None:
      raise ValueError("--checkpoint needs --out (the folder to resume in)")
    main_process = start_runtime(args)
    job = command.load(cfg, args, timings)
  except (ValueError, FileNotFoundError) as e:
    return fail(e)
  except KeyboardInterrupt:
    print("\ninterrupted: nothing written", file=sys.stderr)
    return 130
  ctx = Context(args=args, dataset=dataset, out_dir=out_dir,
                checkpoint_dir=out_dir / "checkpoint" if checkpointing else None,
                main_process=main_process,
                log=_stderr_log if main_process else (lambda message: None),
                progress_factory=progress_lib.ProgressBar if main_process else None,
                timings=timings, start=start)
  try:
    result = command.run(job, ctx)
  except (ConfigError, CheckpointError) as e:
    return fail(e)
  except KeyboardInterrupt:
    print("\ninterrupted" + (f": finished chunks are in {ctx.checkpoint_dir}, rerun to resume"
                             if checkpointing else ": nothing written"), file=sys.stderr)
    return 130
  if not main_process:  # every process holds the same results; one writes them
    return 0
  return command.write(result, ctx)


# ---------------------------------------------------------------------------
# experiments/mnist.py and experiments/har.py
# ---------------------------------------------------------------------------


def _load_experiment(cfg: ExperimentConfig, args, timings):
  with progress_lib.timed(timings, "load_data"):
    return cfg, experiment.load_data(cfg)


def _run_experiment(job, ctx: Context) -> results.ExperimentResult:
  cfg, data = job
  return experiment.run(cfg, data=data, timings=ctx.timings, checkpoint_dir=ctx.checkpoint_dir,
                        progress_factory=ctx.progress_factory, log=ctx.log)


def _write_experiment(result: results.ExperimentResult, ctx: Context) -> int:
  paths = results.write_outputs(ctx.out_dir, result)
  print(results.summary_table(result))
  print(f"outputs: {', '.join(str(p) for p in paths)}")
  return 0


def experiment_command(dataset: str) -> Command:
  name = DATASETS[dataset].display_name
  return Command(
      prog=f"experiments/{dataset}.py",
      description=f"Ensemble FedAvg on {name}: train, certify, write results and the "
                  "certified-accuracy figure.",
      config_class=ExperimentConfig, dataset=dataset, default_dataset=None,
      default_preset="paper", out_name=lambda args, ds: ds, checkpoint=True,
      load=_load_experiment, run=_run_experiment, write=_write_experiment)


def experiment_main(dataset: str, argv: Sequence[str] | None = None) -> int:
  """``experiments/<dataset>.py``."""
  return main(experiment_command(dataset), argv)


# ---------------------------------------------------------------------------
# experiments/sweep.py
# ---------------------------------------------------------------------------

# --param's values: the flag spellings of experiment.SWEEP_FIELDS.
SWEEP_PARAMS = {flag_name(f)[2:]: f for f in experiment.SWEEP_FIELDS}


def _add_sweep_flags(parser: argparse.ArgumentParser, dataset: str) -> None:
  g = parser.add_argument_group("sweep")
  g.add_argument("--param", choices=tuple(SWEEP_PARAMS), required=True,
                 help="the parameter to vary")
  g.add_argument("--values", nargs="+", required=True, metavar="V", help="its values")


def _sweep_defaults(args, dataset: str) -> dict[str, Any]:
  # No baseline unless asked; HAR sweeps of N or alpha at the paper's k = 4
  # (at k = 2 HAR is exact, where neither N nor alpha matters).
  defaults: dict[str, Any] = {"baseline": False}
  if dataset == "har" and args.param in ("N", "alpha"):
    defaults["k"] = 4
  return defaults


def _load_sweep(cfg: ExperimentConfig, args, timings):
  field = SWEEP_PARAMS[args.param]
  kind = typing.get_type_hints(ExperimentConfig)[field]
  values = []
  for text in args.values:
    try:
      values.append(kind(text))
    except ValueError:
      raise ValueError(f"--values: {text!r} is not a valid {kind.__name__} for --param "
                       f"{args.param}") from None
  configs = experiment.sweep_configs(cfg, field, values)
  with progress_lib.timed(timings, "load_data"):
    data = experiment.load_data(configs[0])
  return cfg, field, values, data


def _run_sweep(job, ctx: Context):
  cfg, field, values, data = job
  return field, list(experiment.run_sweep(
      cfg, field, values, data=data, timings=ctx.timings, checkpoint_root=ctx.checkpoint_dir,
      progress_factory=ctx.progress_factory, log=ctx.log))


def _write_sweep(result, ctx: Context) -> int:
  field, runs = result
  for value, run in runs:
    results.write_outputs(ctx.out_dir / f"{ctx.args.param}={value}", run)
  paths = results.write_sweep(ctx.out_dir, field, ctx.dataset, runs)
  print(results.sweep_summary(field, runs, time.perf_counter() - ctx.start))
  print(f"outputs: {ctx.out_dir}/ ({', '.join(p.name for p in paths)}, "
        f"{len(runs)} run folders)")
  return 0


SWEEP = Command(
    prog="experiments/sweep.py",
    description="Certified accuracy for each value of one parameter (Figures 3-6).",
    config_class=ExperimentConfig, dataset=None, default_dataset=None, default_preset="paper",
    out_name=lambda args, ds: f"sweep-{ds}-{args.param}", checkpoint=True,
    load=_load_sweep, run=_run_sweep, write=_write_sweep, add_flags=_add_sweep_flags,
    defaults=_sweep_defaults)


def sweep_main(argv: Sequence[str] | None = None) -> int:
  """``experiments/sweep.py``."""
  return main(SWEEP, argv)


# ---------------------------------------------------------------------------
# experiments/attack.py
# ---------------------------------------------------------------------------


def _load_attack(cfg: AttackEvalConfig, args, timings):
  with progress_lib.timed(timings, "load_data"):
    return cfg, experiment.load_data(cfg)


def _run_attack(job, ctx: Context) -> attack_eval.AttackEvalResult:
  cfg, data = job
  return attack_eval.run(cfg, data, log=ctx.log, timings=ctx.timings)


def _write_attack(result: attack_eval.AttackEvalResult, ctx: Context) -> int:
  paths = attack_eval.write_outputs(ctx.out_dir, result)
  print(attack_eval.summary_table(result))
  print(f"outputs: {', '.join(paths)}")
  return attack_eval.report(result)


ATTACK = Command(
    prog="experiments/attack.py",
    description="Attack the exact-mode ensemble with malicious clients and check that no "
                "certified prediction changes (exit status 1 if one does).",
    config_class=AttackEvalConfig, dataset=None, default_dataset="har", default_preset="cpu",
    out_name=lambda args, ds: "attack", checkpoint=False,
    load=_load_attack, run=_run_attack, write=_write_attack)


def attack_main(argv: Sequence[str] | None = None) -> int:
  """``experiments/attack.py``."""
  return main(ATTACK, argv)
