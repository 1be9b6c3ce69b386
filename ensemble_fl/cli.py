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
   paper's ``--N``; ``--preset`` gives every field no flag sets. A flag
   given explicitly that the run would ignore (``--q`` on HAR, ``--k`` in
   partition mode, ``--N`` in exact mode, a sweep's own ``--param`` flag) is
   refused, not dropped;
2. reports a bad flag, an impossible setting, a bad output folder or missing
   data as one ``error: ...`` line on stderr, naming the flag, with exit
   status 2, before any training;
3. joins the multi-process runtime (``--distributed``; JAX's own
   ``jax.distributed``) when asked, before any JAX computation, waiting at
   most ``--init-timeout`` seconds for the other processes;
4. checks the output folder (process 0) before any data is loaded: ``--out``
   must be a folder it can write, new or empty unless ``--overwrite`` or,
   with ``--checkpoint``, holding a checkpoint to resume; the default is a
   new folder ``results/<name>-<timestamp>[-i]/``, created atomically, so two
   runs never share one;
5. runs the command; Ctrl-C ends it with exit status 130;
6. on process 0 only, writes the outputs (each file renamed into place when
   complete) and prints the summary.

Exit status: 0 done; 1 the attack check found a violation; 2 refused (one
``error:`` line, nothing trained); 3 models diverged to NaN or inf (outputs
written and marked; ``--keep-nonfinite`` accepts such a run with 0); 130
interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import tempfile
import threading
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
from ensemble_fl.config import (DATASETS, INT32_MAX, PRESET_NAMES, AttackEvalConfig,
                                ConfigError, ExperimentConfig, ignored_fields, preset_values)
from ensemble_fl.data import paths
from ensemble_fl.ensemble import MemoryEstimateError

# Flags spelled other than their field's name with dashes.
FLAG_SPELLINGS = {"num_models": "N"}

EXIT_REFUSED = 2       # a bad flag, setting, output folder or data: nothing trained
EXIT_NONFINITE = 3     # models diverged: outputs written, marked (see --keep-nonfinite)
EXIT_INTERRUPTED = 130

# Seconds every process of a multi-process run waits for the others to join.
DEFAULT_INIT_TIMEOUT_S = 300
# The subfolder of --out that --checkpoint resumes from.
CHECKPOINT_SUBDIR = "checkpoint"


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
  """Adds a flag for every field of ``cls``.

  Every flag defaults to None (the preset decides); the help shows the
  presets' values. Fields that do not apply to ``dataset`` get a flag too,
  left out of ``--help``, so that giving one is refused with the reason
  (:func:`refuse_ignored`) rather than as an unknown flag.

  Returns:
    ``{field: flag}`` of the flags added.
  """
  hints = typing.get_type_hints(cls)
  presets = {name: preset_values(cls, dataset, name) for name in PRESET_NAMES}
  group = parser.add_argument_group("settings (override the preset)")
  flags = {}
  for field in dataclasses.fields(cls):
    if field.name == "dataset":
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
    if field.name in DATASETS[dataset].unused_fields:
      kwargs["help"] = argparse.SUPPRESS
    flags[field.name] = flag_name(field.name)
    group.add_argument(flags[field.name], **kwargs)
  return flags


def given_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
  """``{field: value}`` of the config flags given on the command line."""
  return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
          if getattr(args, f.name, None) is not None}


def config_from_args(cls: type, args: argparse.Namespace, dataset: str,
                     defaults: dict[str, Any] | None = None):
  """The preset ``args.preset``, then ``defaults``, then every flag given: one
  config, validated once.

  Raises:
    ConfigError: the combination is invalid, or a flag given explicitly
      does not apply to it (:func:`refuse_ignored`).
  """
  given = given_fields(cls, args)
  for field in given:  # before the config: its checks would blame other flags
    if field in DATASETS[dataset].unused_fields:
      reason = DATASETS[dataset].unused_reason
      raise ConfigError(field, f"does not apply to {DATASETS[dataset].display_name} ({reason})")
  cfg = cls(**{**preset_values(cls, dataset, args.preset), **(defaults or {}), **given})
  refuse_ignored(cfg, given)
  return cfg


def refuse_ignored(cfg, given: Sequence[str]) -> None:
  """Refuses a flag given explicitly whose value ``cfg``'s run would ignore
  (``config.ignored_fields``): it would be recorded as if it had been used.

  Raises:
    ConfigError: naming the first such field.
  """
  ignored = ignored_fields(cfg)
  for field in given:
    if field in ignored:
      raise ConfigError(field, ignored[field])


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
                 help="CPU only: how many CPU devices this process exposes (default 1, at most "
                      "the CPU cores); lets one machine test a multi-device or multi-process "
                      "run")
  g.add_argument("--init-timeout", dest="init_timeout", type=int, metavar="SECONDS",
                 help=f"with --distributed: how long to wait for every process to join "
                      f"(default {DEFAULT_INIT_TIMEOUT_S})")


def check_runtime_flags(args: argparse.Namespace) -> bool:
  """Checks the multi-process flags (no JAX computation).

  Returns:
    Whether a multi-process runtime is wanted.

  Raises:
    ValueError: an explicit flag without ``--distributed``, or a bad value.
  """
  explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
              "--process-id": args.process_id, "--init-timeout": args.init_timeout}
  wanted = args.distributed or distributed.env_flag_distributed()
  given = [flag for flag, value in explicit.items() if value is not None]
  if given and not wanted:
    raise ValueError(f"{', '.join(given)} need(s) --distributed")
  cores = os.cpu_count() or 1
  if args.local_devices is not None and not 1 <= args.local_devices <= cores:
    raise ValueError(f"--local-devices must be in [1, {cores}], the CPU cores of this machine "
                     f"(each CPU device is a thread pool of its own), got {args.local_devices}")
  if args.init_timeout is not None and not 1 <= args.init_timeout <= INT32_MAX:
    raise ValueError(f"--init-timeout must be in [1, {INT32_MAX}] seconds, got "
                     f"{args.init_timeout}")
  if args.coordinator is not None:
    try:
      distributed.check_coordinator(args.coordinator)
    except ValueError:
      raise ValueError(f"--coordinator must be host:port with a port in [1, 65535] (e.g. "
                       f"10.0.0.1:1234), got {args.coordinator!r}") from None
  for flag, value in (("--num-processes", args.num_processes),
                      ("--process-id", args.process_id)):
    if value is not None and not 0 <= value <= INT32_MAX:
      raise ValueError(f"{flag} must be in [0, {INT32_MAX}], got {value}")
  if args.num_processes is not None and args.num_processes < 1:
    raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
  if None not in (args.num_processes, args.process_id) and \
      not args.process_id < args.num_processes:
    raise ValueError(f"--process-id must be in [0, {args.num_processes}) (--num-processes), "
                     f"got {args.process_id}")
  return wanted


def start_runtime(args: argparse.Namespace) -> bool:
  """Applies the multi-process flags before any JAX computation.

  A multi-process run prints one line while it waits for the other processes
  and gives up after ``--init-timeout`` seconds with one ``error:`` line and
  exit status 2 (JAX itself would abort the process with a stack trace).

  Returns:
    True when this process writes results (always on a single process).

  Raises:
    ValueError: an explicit flag without ``--distributed``, or bad values.
  """
  if check_runtime_flags(args):
    _join_runtime(args)
  elif args.local_devices is not None:
    jax.config.update("jax_num_cpu_devices", args.local_devices)
  return distributed.is_main_process()


def _join_runtime(args: argparse.Namespace) -> None:
  timeout = args.init_timeout or DEFAULT_INIT_TIMEOUT_S
  where = (f"the coordinator at {args.coordinator}" if args.coordinator else
           "the cluster's coordinator (detected by JAX)")
  who = (f"process {args.process_id} of {args.num_processes}" if args.num_processes else
         "this process")
  _stderr_log(f"joining the multi-process runtime as {who} at {where}; waiting up to "
              f"{timeout} s for every process (--init-timeout)")

  def give_up():  # runs while jax.distributed.initialize blocks the main thread
    print(f"error: not every process joined {where} within {timeout} s (--init-timeout): "
          "start every process of the run, each with the same --coordinator and "
          "--num-processes and its own --process-id", file=sys.stderr, flush=True)
    os._exit(EXIT_REFUSED)  # pylint: disable=protected-access

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:  # JAX's own timeout, later, only as a backstop: it aborts the process
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           local_device_count=args.local_devices,
                           initialization_timeout=timeout + 60)
  finally:
    watchdog.cancel()


# ---------------------------------------------------------------------------
# Commands and the one main.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Context:
  """What a command's run and write phases get from :func:`main`.

  Attributes:
    args: the parsed flags; dataset: the data set.
    out_dir: the output folder (checked and created on process 0).
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
    load: ``load(cfg, args, timings) -> job``: its own checks and the data
      (a ValueError or FileNotFoundError here is the user's: one line).
    run: ``run(job, context) -> result`` (an error here is a bug and keeps
      its traceback, except a checkpoint or config mismatch, or a chunk too
      large for memory).
    write: ``write(result, context)``: the outputs and the summary, on
      process 0 only.
    status: ``status(result, context) -> exit status``, on every process (a
      scheduler may watch any of them, so all exit alike); its message, if
      any, on process 0 only.
    add_flags: adds its own flags (beyond the config's).
    defaults: ``defaults(args, dataset)``: field values between the preset
      and the flags.
    check_flags: ``check_flags(args, given)``: refuses flag combinations of
      its own (``given``: the config fields given as flags), before the
      config is built.
    check_config: ``check_config(cfg, args)``: its own checks of the config,
      before the output folder is made.
    nonfinite_flag: it has ``--keep-nonfinite`` (runs that train models).
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
  write: Callable[[Any, Context], None]
  status: Callable[[Any, Context], int]
  add_flags: Callable[[argparse.ArgumentParser, str], None] | None = None
  defaults: Callable[[argparse.Namespace, str], dict[str, Any]] | None = None
  check_flags: Callable[[argparse.Namespace, dict[str, Any]], None] | None = None
  check_config: Callable[[Any, argparse.Namespace], None] | None = None
  nonfinite_flag: bool = False


# ---------------------------------------------------------------------------
# The output folder: checked before any work, never another run's.
# ---------------------------------------------------------------------------

DEFAULT_OUT_ROOT = Path("results")


def _probe_writable(folder: Path, name: str) -> None:
  """Creates and removes a file in ``folder``: writable, really (root, /proc,
  read-only mounts all answer here)."""
  try:
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"{name}: cannot write there ({e.strerror or e})") from None


def _first_missing(path: Path) -> Path | None:
  """The topmost folder that ``path.mkdir(parents=True)`` would create (None: it exists)."""
  missing = None
  for folder in (path, *path.parents):
    if folder.exists():
      break
    missing = folder
  return missing


def remove_created(folder: Path, top: Path) -> None:
  """Removes ``folder`` and its parents up to ``top`` (which this run created),
  as long as they are empty: never anything written."""
  for path in (folder, *folder.parents):
    try:
      path.rmdir()
    except OSError:
      return
    if path == top:
      return


def create_unique_dir(root: Path, name: str) -> Path:
  """A new folder ``root/<name>-<timestamp>`` (``-2``, ``-3``, ... when taken).

  ``os.mkdir`` fails on an existing folder, so two runs started in the same
  second get different folders.

  Raises:
    ValueError: ``root`` cannot hold a new folder (one line).
  """
  stamp = time.strftime("%Y%m%d-%H%M%S")
  try:
    root.mkdir(parents=True, exist_ok=True)
    for i in itertools.count(1):
      path = root / (f"{name}-{stamp}" if i == 1 else f"{name}-{stamp}-{i}")
      try:
        os.mkdir(path)
        return path
      except FileExistsError:
        continue
  except OSError as e:
    raise ValueError(f"cannot create an output folder in {root}/ ({e.strerror or e}); name "
                     "one with --out") from None
  raise AssertionError("unreachable")


def prepare_out_dir(out: Path | None, default_name: str, *, overwrite: bool = False,
                    resume: bool = False) -> tuple[Path, Path | None]:
  """Checks (and creates) the output folder, before any work.

  Args:
    out: ``--out``, or None for a new folder under :data:`DEFAULT_OUT_ROOT`.
    default_name: the new folder's name before its timestamp.
    overwrite: ``--overwrite``: a non-empty ``out`` is fine.
    resume: ``--checkpoint``: ``out`` may hold files when it holds a
      checkpoint (whose fingerprint the trainer checks against this run).

  Returns:
    ``(folder, created)``: ``created`` is the topmost folder this call made
    (``folder`` or a parent), None when ``folder`` existed. A run that ends
    without writing removes them again (:func:`remove_created`).

  Raises:
    ValueError: ``out`` is a file, cannot be created or written, or holds
      files this run did not write (one line each).
  """
  if out is None:
    root_missing = _first_missing(DEFAULT_OUT_ROOT)
    out = create_unique_dir(DEFAULT_OUT_ROOT, default_name)
    name, created = str(out), root_missing or out
  else:
    name = f"--out {out}"
    if out.exists() and not out.is_dir():
      raise ValueError(f"{name} is a file, not a folder")
    created = _first_missing(out)
    try:
      out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f"{name}: cannot create the folder ({e.strerror or e})") from None
  try:
    _probe_writable(out, name)
    # Leftovers of a write that was killed are not results.
    entries = sorted(e for e in os.listdir(out) if not e.startswith(results.STAGING_PREFIX))
    if entries and not overwrite and not (resume and CHECKPOINT_SUBDIR in entries):
      shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
      hint = ("; it holds a checkpoint: add --checkpoint to resume that run"
              if CHECKPOINT_SUBDIR in entries else "")
      raise ValueError(f"{name} already holds files ({shown}): name a new or empty folder, or "
                       f"pass --overwrite to replace them{hint}")
  except ValueError:
    if created is not None:
      remove_created(out, created)
    raise
  return out, created


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
                      help="output folder, new or empty (default: a new "
                           "results/<name>-<timestamp>/)")
  parser.add_argument("--overwrite", action="store_true",
                      help="let --out be a folder that holds files (those this run writes are "
                           "replaced)")
  if command.checkpoint:
    parser.add_argument("--checkpoint", action="store_true",
                        help="store finished chunks of models in OUT/checkpoint/; rerunning "
                             "the same command with the same --out resumes from them")
  if command.nonfinite_flag:
    parser.add_argument("--keep-nonfinite", dest="keep_nonfinite", action="store_true",
                        help=f"accept a run in which models diverged to NaN or inf (exit 0, "
                             f"not {EXIT_NONFINITE}); the outputs say so either way")
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


# The library's words for what the command line calls a flag.
_LIBRARY_TERMS = {"source 'uci'": "--har-data uci", "source 'hapt'": "--har-data hapt"}


def _one_line(e: BaseException, flags: dict[str, str]) -> str:
  if isinstance(e, ConfigError):
    return e.describe(lambda field: flags.get(field, field))
  text = " ".join(str(e).split()) or type(e).__name__
  for term, flag in _LIBRARY_TERMS.items():
    text = text.replace(term, flag)
  return text


def _prepare_output(command: Command, args: argparse.Namespace, dataset: str,
                    main_process: bool) -> tuple[Path, bool]:
  """Process 0 checks and creates the output folder; every process learns
  whether it could (a refusal on process 0 ends every process).

  Returns:
    ``(folder, created)`` as :func:`prepare_out_dir` (on other processes:
    ``--out`` unchecked, None).
  """
  error = None
  out, created = args.out or DEFAULT_OUT_ROOT, None
  if main_process:
    try:
      out, created = prepare_out_dir(
          args.out, command.out_name(args, dataset), overwrite=args.overwrite,
          resume=command.checkpoint and args.checkpoint)
    except ValueError as e:
      error = e
  if distributed.is_multiprocess():
    if not distributed.broadcast_int(int(error is None)) and error is None:
      error = ValueError("process 0 refused the output folder (its message says why)")
  if error is not None:
    raise error
  return out, created


def main(command: Command, argv: Sequence[str] | None = None) -> int:
  """Runs ``command`` with the flags ``argv`` (default: ``sys.argv[1:]``).

  Returns:
    The exit status: 0 done, 2 refused (a bad flag, setting, output folder
    or data: one ``error:`` line, nothing trained), 3 models diverged (see
    ``--keep-nonfinite``), 130 interrupted; the attack check returns 1 when
    it finds a violation.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  start = time.perf_counter()
  dataset = _dataset_of(command, argv)
  parser, flags = make_parser(command, dataset)
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help, or a bad flag already reported
    return e.code if isinstance(e.code, int) else EXIT_REFUSED
  dataset = args.dataset if command.dataset is None else command.dataset
  checkpointing = command.checkpoint and args.checkpoint

  def fail(e: BaseException) -> int:
    print(f"error: {_one_line(e, flags)}", file=sys.stderr)
    return EXIT_REFUSED

  timings: dict[str, float] = {}
  out_dir = created = None  # created: made by this run, removed again while empty
  try:
    try:
      if command.check_flags is not None:
        command.check_flags(args, given_fields(command.config_class, args))
      cfg = config_from_args(command.config_class, args, dataset,
                             command.defaults(args, dataset) if command.defaults else None)
      if command.check_config is not None:
        command.check_config(cfg, args)
      if cfg.data_dir is not None:  # a file, no folder, an unknown ~user: before any work
        try:
          paths.check_data_dir(cfg.data_dir)
        except (ValueError, FileNotFoundError) as e:
          raise type(e)(f"--data-dir {e}") from e
      if checkpointing and args.out is None:
        raise ValueError("--checkpoint needs --out (the folder to resume in)")
      main_process = start_runtime(args)
      out_dir, created = _prepare_output(command, args, dataset, main_process)
      job = command.load(cfg, args, timings)
    except (ValueError, FileNotFoundError) as e:
      return fail(e)
    except KeyboardInterrupt:
      print("\ninterrupted: nothing written", file=sys.stderr)
      return EXIT_INTERRUPTED
    ctx = Context(args=args, dataset=dataset, out_dir=out_dir,
                  checkpoint_dir=out_dir / CHECKPOINT_SUBDIR if checkpointing else None,
                  main_process=main_process,
                  log=_stderr_log if main_process else (lambda message: None),
                  progress_factory=progress_lib.ProgressBar if main_process else None,
                  timings=timings, start=start)
    try:
      result = command.run(job, ctx)
    except (ConfigError, CheckpointError, MemoryEstimateError) as e:
      return fail(e)
    except KeyboardInterrupt:
      print("\ninterrupted" + (f": finished chunks are in {ctx.checkpoint_dir}, rerun to resume"
                               if checkpointing else ": nothing written"), file=sys.stderr)
      return EXIT_INTERRUPTED
    if main_process:  # every process holds the same results; one writes them
      command.write(result, ctx)
    return command.status(result, ctx)
  finally:
    if created is not None:
      remove_created(out_dir, created)


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


def nonfinite_status(note: str, ctx: Context) -> int:
  """The exit status of a run whose outputs are written: 3 when ``note`` says
  models diverged (one ``error:`` line on process 0), unless ``--keep-nonfinite``."""
  if not note:
    return 0
  if ctx.args.keep_nonfinite:
    ctx.log(f"warning: {note}; kept (--keep-nonfinite) and marked in every output")
    return 0
  if ctx.main_process:
    print(f"error: {note}; the outputs in {ctx.out_dir} are written and marked as such (a "
          f"smaller --lr may help; --keep-nonfinite accepts such a run with exit status 0)",
          file=sys.stderr)
  return EXIT_NONFINITE


def _write_experiment(result: results.ExperimentResult, ctx: Context) -> None:
  paths = results.write_outputs(ctx.out_dir, result)
  print(results.summary_table(result))
  print(f"outputs: {', '.join(str(p) for p in paths)}")


def _experiment_status(result: results.ExperimentResult, ctx: Context) -> int:
  return nonfinite_status(result.nonfinite_note(), ctx)


def experiment_command(dataset: str) -> Command:
  name = DATASETS[dataset].display_name
  return Command(
      prog=f"experiments/{dataset}.py",
      description=f"Ensemble FedAvg on {name}: train, certify, write results and the "
                  "certified-accuracy figure.",
      config_class=ExperimentConfig, dataset=dataset, default_dataset=None,
      default_preset="paper", out_name=lambda args, ds: ds, checkpoint=True,
      load=_load_experiment, run=_run_experiment, write=_write_experiment,
      status=_experiment_status,
      nonfinite_flag=True)


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


def _check_sweep_flags(args, given: dict[str, Any]) -> None:
  field = SWEEP_PARAMS[args.param]
  if field in given:
    raise ValueError(f"{flag_name(field)} and --param {args.param} exclude each other: the "
                     f"sweep sets {flag_name(field)} to each of --values")


def _sweep_defaults(args, dataset: str) -> dict[str, Any]:
  # No baseline unless asked; HAR sweeps of N or alpha at the paper's k = 4
  # (at k = 2 HAR is exact, where neither N nor alpha matters).
  defaults: dict[str, Any] = {"baseline": False}
  if dataset == "har" and args.param in ("N", "alpha"):
    defaults["k"] = 4
  return defaults


def _sweep_values(args) -> list[Any]:
  field = SWEEP_PARAMS[args.param]
  kind = typing.get_type_hints(ExperimentConfig)[field]
  values = []
  for text in args.values:
    try:
      values.append(kind(text))
    except ValueError:
      raise ValueError(f"--values: {text!r} is not a valid {kind.__name__} for --param "
                       f"{args.param}") from None
  return values


def _check_sweep_config(cfg: ExperimentConfig, args) -> None:
  experiment.sweep_configs(cfg, SWEEP_PARAMS[args.param], _sweep_values(args))


def _load_sweep(cfg: ExperimentConfig, args, timings):
  field, values = SWEEP_PARAMS[args.param], _sweep_values(args)
  configs = experiment.sweep_configs(cfg, field, values)
  with progress_lib.timed(timings, "load_data"):
    data = experiment.load_data(configs[0])
  return cfg, field, values, data


def _run_sweep(job, ctx: Context):
  cfg, field, values, data = job
  return field, list(experiment.run_sweep(
      cfg, field, values, data=data, timings=ctx.timings, checkpoint_root=ctx.checkpoint_dir,
      progress_factory=ctx.progress_factory, log=ctx.log))


def _write_sweep(result, ctx: Context) -> None:
  field, runs = result
  for value, run in runs:
    results.write_outputs(ctx.out_dir / f"{ctx.args.param}={value}", run)
  paths = results.write_sweep(ctx.out_dir, field, ctx.dataset, runs)
  print(results.sweep_summary(field, runs, time.perf_counter() - ctx.start))
  print(f"outputs: {ctx.out_dir}/ ({', '.join(p.name for p in paths)}, "
        f"{len(runs)} run folders)")


def _sweep_status(result, ctx: Context) -> int:
  field, runs = result
  return nonfinite_status(results.sweep_nonfinite_note(field, runs), ctx)


SWEEP = Command(
    prog="experiments/sweep.py",
    description="Certified accuracy for each value of one parameter (Figures 3-6).",
    config_class=ExperimentConfig, dataset=None, default_dataset=None, default_preset="paper",
    out_name=lambda args, ds: f"sweep-{ds}-{args.param}", checkpoint=True,
    load=_load_sweep, run=_run_sweep, write=_write_sweep, status=_sweep_status,
    add_flags=_add_sweep_flags,
    defaults=_sweep_defaults, check_flags=_check_sweep_flags, check_config=_check_sweep_config,
    nonfinite_flag=True)


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


def _write_attack(result: attack_eval.AttackEvalResult, ctx: Context) -> None:
  paths = results.publish(ctx.out_dir, lambda staging: attack_eval.write_outputs(staging, result))
  print(attack_eval.summary_table(result))
  print(f"outputs: {', '.join(str(p) for p in paths)}")


def _attack_status(result: attack_eval.AttackEvalResult, ctx: Context) -> int:
  return attack_eval.report(result, verbose=ctx.main_process)


ATTACK = Command(
    prog="experiments/attack.py",
    description="Attack the exact-mode ensemble with malicious clients and check that no "
                "certified prediction changes (exit status 1 if one does).",
    config_class=AttackEvalConfig, dataset=None, default_dataset="har", default_preset="cpu",
    out_name=lambda args, ds: "attack", checkpoint=False,
    load=_load_attack, run=_run_attack, write=_write_attack, status=_attack_status)


def attack_main(argv: Sequence[str] | None = None) -> int:
  """``experiments/attack.py``."""
  return main(ATTACK, argv)
