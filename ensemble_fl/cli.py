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
4. claims and checks the output folder (process 0) before any data is
   loaded (:func:`claim_out_dir`: of two runs on one folder, one gets it;
   with ``--checkpoint``, a finished run with other settings is refused):
   ``--out`` must be a folder it can write, new or empty unless ``--overwrite`` or,
   with ``--checkpoint``, holding a checkpoint to resume; the default is a
   new folder ``results/<name>-<timestamp>[-i]/``, created atomically, so two
   runs never share one;
5. runs the command; Ctrl-C ends it with exit status 130;
6. on process 0 only, writes the outputs (each file renamed into place when
   complete) and prints the summary.

Exit status: 0 done; 1 the attack check found a violation; 2 refused (one
``error:`` line, nothing trained); 3 models diverged to NaN or inf (outputs
written and marked; ``--keep-nonfinite`` accepts such a run with 0); 4 the OS
refused a write (disk full, file-size limit: one ``error:`` line naming the
path; files already in place stay whole); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import itertools
import json
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
import numpy as np

from ensemble_fl import attack_eval
from ensemble_fl import certify as certify_lib
from ensemble_fl import deploy
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
EXIT_WRITE_FAILED = 4  # the OS refused a write (disk full, file-size limit): one error line
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
  """Parses ``'1,4,8'`` (or ``'1 4 8'``) into a tuple of ``kind``; an empty
  item (``'1,,8'``, ``'1,'``) is refused, not dropped."""
  def parse(text: str) -> tuple:
    items = [v.strip() for v in text.split(",")] if "," in text else text.split()
    if "" in items:
      raise argparse.ArgumentTypeError(f"empty item in {text!r}: expected comma-separated "
                                       f"{kind.__name__} values")
    try:
      return tuple(kind(v) for v in items)
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
    planned_results: ``planned_results(cfg, args) -> {subfolder: config}``:
      where it publishes a ``results.json`` and for which config (``"."``:
      the output folder itself); with ``--checkpoint``, a finished run there
      with other settings is refused (:func:`refuse_replacing_finished`).
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
  planned_results: Callable[[Any, argparse.Namespace], dict[str, Any]] | None = None


# ---------------------------------------------------------------------------
# The output folder: checked before any work, never another run's.
# ---------------------------------------------------------------------------

DEFAULT_OUT_ROOT = Path("results")


# The file a run holds locked in its output folder while it lives.
CLAIM_NAME = ".claimed-by-run"


class Claim:
  """An output folder held by this run: an exclusive ``flock`` on ``CLAIM_NAME``.

  The kernel drops the lock when the process dies, so a killed run leaves no
  claim behind that blocks the next one (only the empty file, which the next
  claim takes over).
  """

  def __init__(self, path: Path, fd: int):
    self.path, self._fd = path, fd

  def release(self) -> None:
    """Removes the file, then drops the lock (a waiting claimant sees the file gone)."""
    try:
      os.unlink(self.path)
    except OSError:
      pass
    os.close(self._fd)


def claim_out_dir(folder: Path, name: str) -> Claim:
  """Claims ``folder`` for this run, atomically: of two runs, one gets it.

  Creating the claim file also proves that ``folder`` can be written (root,
  /proc and read-only mounts all answer here).

  Raises:
    ValueError: another live run holds ``folder``, or it cannot be written.
  """
  path = folder / CLAIM_NAME
  try:
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise ValueError(f"{name}: another run is writing into this folder now: wait for it "
                         "to finish, or name another folder") from None
      try:  # the holder before us may have removed the file meanwhile: claim the new one
        if os.path.samestat(os.fstat(fd), os.stat(path)):
          return Claim(path, fd)
      except FileNotFoundError:
        pass
      os.close(fd)
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


# ---------------------------------------------------------------------------
# The plan studies' shared flags (experiments/plan_compare.py, plan_budget.py).
# ---------------------------------------------------------------------------

# FedAvg when no flag sets it. MNIST: the reference runs' settings at the paper's
# N (60 rounds at the paper's lr 0.001 would leave the models untrained); HAR:
# the CPU preset's.
PLAN_STUDY_DEFAULTS = {
    "mnist": dict(n=200, global_iters=60, lr=0.1, batch_size=8),
    "har": dict(n=30, global_iters=10, lr=0.05, batch_size=32),
}


def add_plan_study_flags(parser: argparse.ArgumentParser, *, mnist_test_size: int) -> None:
  """The data, FedAvg and output flags of a plan study; see :func:`complete_plan_study_args`."""
  parser.add_argument("--dataset", choices=tuple(PLAN_STUDY_DEFAULTS), default="mnist")
  parser.add_argument("--n", type=int, help="clients (default: mnist 200; har: its 30 users)")
  fedavg_help = ", ".join(f"{d}: {{{d}}}" for d in PLAN_STUDY_DEFAULTS)
  for field in ("global_iters", "lr", "batch_size"):
    shown = fedavg_help.format(**{d: v[field] for d, v in PLAN_STUDY_DEFAULTS.items()})
    parser.add_argument(flag_name(field), dest=field, type=float if field == "lr" else int,
                        help=f"(default {shown})")
  parser.add_argument(flag_name("max_shift"), dest="max_shift", type=int, default=0,
                      help="MNIST: local augmentation, random shifts of up to this many pixels "
                           "(default 0: none)")
  parser.add_argument("--test-size", type=int,
                      help=f"test inputs (default: mnist {mnist_test_size}; har: all)")
  parser.set_defaults(mnist_test_size=mnist_test_size)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--checkpoint-root", type=Path,
                      help="keep every ensemble's trained chunks in its own subfolder; a rerun "
                           "resumes them")
  parser.add_argument("--out", type=Path, required=True, help="new or empty folder")


def complete_plan_study_args(args: argparse.Namespace) -> None:
  """Fills the flags left unset with :data:`PLAN_STUDY_DEFAULTS`, in ``args``
  (so that a study's JSON records what ran).

  Raises:
    ValueError: ``--n`` other than HAR's users on HAR.
  """
  for field, value in PLAN_STUDY_DEFAULTS[args.dataset].items():
    if getattr(args, field) is None:
      setattr(args, field, value)
  if args.test_size is None and args.dataset == "mnist":
    args.test_size = args.mnist_test_size
  users = PLAN_STUDY_DEFAULTS["har"]["n"]
  if args.dataset == "har" and args.n != users:
    raise ValueError(f"--n must be HAR's {users} users, got {args.n}")


# The config fields a plan study sets from its own flags, and those flags.
PLAN_STUDY_FLAGS = {"dataset": "--dataset", "n_clients": "--n", "seed": "--seed",
                    **{f: flag_name(f) for f in ("global_iters", "lr", "batch_size", "max_shift",
                                                 "test_size")}}


def plan_study_config(args: argparse.Namespace, **fields: Any) -> ExperimentConfig:
  """The study's config (its data, FedAvg and seed; the plan is made by the script)
  from ``args`` completed by :func:`complete_plan_study_args`; ``fields`` are the
  config's plan fields (k, num_models, mode).

  Raises:
    ValueError: a setting out of range, named by its flag (:data:`PLAN_STUDY_FLAGS`).
  """
  try:
    return ExperimentConfig(dataset=args.dataset, n_clients=args.n,
                            global_iters=args.global_iters, lr=args.lr,
                            batch_size=args.batch_size, max_shift=args.max_shift,
                            test_size=args.test_size, seed=args.seed, **fields)
  except ConfigError as e:
    raise ValueError(e.describe(lambda field: PLAN_STUDY_FLAGS.get(field, field))) from None


def prepare_out_dir(out: Path | None, default_name: str, *, overwrite: bool = False,
                    resume: bool = False) -> tuple[Path, Path | None, Claim]:
  """Checks, creates and claims the output folder, before any work.

  Args:
    out: ``--out``, or None for a new folder under :data:`DEFAULT_OUT_ROOT`.
    default_name: the new folder's name before its timestamp.
    overwrite: ``--overwrite``: a non-empty ``out`` is fine.
    resume: ``--checkpoint``: ``out`` may hold files when it holds a
      checkpoint (whose fingerprint the trainer checks against this run).

  Returns:
    ``(folder, created, claim)``: ``created`` is the topmost folder this call
    made (``folder`` or a parent), None when ``folder`` existed; ``claim``
    (:func:`claim_out_dir`) is taken before the folder is checked, so two runs
    started together cannot both find it empty. The run releases the claim
    when it ends, and one that ends without writing removes the folders it
    created (:func:`remove_created`).

  Raises:
    ValueError: ``out`` is a file, cannot be created or written, is held by
      another run, or holds files this run did not write (one line each).
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
  claim = None
  try:
    claim = claim_out_dir(out, name)
    # Leftovers of a write that was killed, and the claim, are not results.
    entries = sorted(e for e in os.listdir(out)
                     if not e.startswith(results.STAGING_PREFIX) and e != CLAIM_NAME)
    if entries and not overwrite and not (resume and CHECKPOINT_SUBDIR in entries):
      shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
      hint = ("; it holds a checkpoint: add --checkpoint to resume that run"
              if CHECKPOINT_SUBDIR in entries else "")
      raise ValueError(f"{name} already holds files ({shown}): name a new or empty folder, or "
                       f"pass --overwrite to replace them{hint}")
  except ValueError:
    if claim is not None:
      claim.release()
    if created is not None:
      remove_created(out, created)
    raise
  return out, created, claim


def release_out_dir(out: Path, created: Path | None, claim: Claim | None) -> None:
  """Ends a run's hold on its output folder: the claim, then the folders it
  created if they are still empty."""
  if claim is not None:
    claim.release()
  if created is not None:
    remove_created(out, created)


def _shown_setting(value: Any) -> str:
  return _show(tuple(value) if isinstance(value, list) else value)


def refuse_replacing_finished(out: Path, planned: dict[str, Any], flags: dict[str, str]) -> None:
  """Refuses a resume that would publish other results over a finished run's.

  A finished run records its settings in ``results.json``. Rerunning it with
  the same settings publishes the same results again (its chunks are loaded,
  not trained: how an older run gets its ``ensemble/``); any other setting
  (``--test-size`` too, which the checkpoint does not fingerprint) would
  replace them, which only ``--overwrite`` may.

  Raises:
    ValueError: naming the file and the settings that differ.
  """
  for sub, cfg in planned.items():
    path = out / sub / "results.json"
    if not path.exists():
      continue
    recorded = results.recorded_config(path)
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if recorded == wanted:
      continue
    if recorded is None:
      what = "settings it does not record readably"
    else:
      what = "other settings (" + ", ".join(
          f"{flags.get(f, flag_name(f))} {_shown_setting(recorded.get(f))} there, "
          f"{_shown_setting(v)} now" for f, v in wanted.items() if recorded.get(f) != v) + ")"
    raise ValueError(f"{path} holds a finished run's results with {what}: they are never "
                     "replaced without --overwrite; rerun with its settings, or name another "
                     "--out")


# What to do when the OS refuses a write, by errno.
_WRITE_REMEDIES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "raise the file-size limit (ulimit -f)",
    errno.EROFS: "write to a writable file system",
    errno.EACCES: "make it writable",
    errno.EPERM: "make it writable",
    errno.EISDIR: "move that folder away",
}


def os_error_line(e: OSError, where: Path) -> str:
  """One line for an OS error at a write: the path (``where`` when the error
  names none, as a full disk during ``write`` does) and what to do."""
  path = e.filename or where
  remedy = _WRITE_REMEDIES.get(e.errno, "check that it can be written")
  return f"{path}: {e.strerror or e}: {remedy}, then rerun"


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
    ``(folder, created, claim)`` as :func:`prepare_out_dir` (on other
    processes: ``--out`` unchecked, None, None).
  """
  error = None
  out, created, claim = args.out or DEFAULT_OUT_ROOT, None, None
  if main_process:
    try:
      out, created, claim = prepare_out_dir(
          args.out, command.out_name(args, dataset), overwrite=args.overwrite,
          resume=command.checkpoint and args.checkpoint)
    except ValueError as e:
      error = e
  if distributed.is_multiprocess():
    if not distributed.broadcast_int(int(error is None)) and error is None:
      error = ValueError("process 0 refused the output folder (its message says why)")
  if error is not None:
    if claim is not None:
      release_out_dir(out, created, claim)
    raise error
  return out, created, claim


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
  out_dir = created = claim = None  # created: made by this run, removed again while empty
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
      out_dir, created, claim = _prepare_output(command, args, dataset, main_process)
      if main_process and checkpointing and not args.overwrite and command.planned_results:
        refuse_replacing_finished(out_dir, command.planned_results(cfg, args), flags)
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
    writing = ctx.checkpoint_dir  # where an OS error that names no file was writing
    try:
      result = command.run(job, ctx)
      writing = out_dir
      if main_process:  # every process holds the same results; one writes them
        command.write(result, ctx)
    except (ConfigError, CheckpointError, MemoryEstimateError) as e:
      return fail(e)
    except OSError as e:  # a full disk or a file-size limit: files in place stay whole
      kept = (f"; finished chunks stay in {ctx.checkpoint_dir}: the rerun resumes from them"
              if checkpointing else "")
      print(f"error: {os_error_line(e, writing or out_dir)}{kept}", file=sys.stderr)
      return EXIT_WRITE_FAILED
    except KeyboardInterrupt:
      print("\ninterrupted" + (f": finished chunks are in {ctx.checkpoint_dir}, rerun to resume"
                               if checkpointing else ": nothing written"), file=sys.stderr)
      return EXIT_INTERRUPTED
    return command.status(result, ctx)
  finally:
    release_out_dir(out_dir, created, claim)


# ---------------------------------------------------------------------------
# experiments/mnist.py and experiments/har.py
# ---------------------------------------------------------------------------


def _load_experiment(cfg: ExperimentConfig, args, timings):
  with progress_lib.timed(timings, "load_data"):
    return cfg, experiment.load_data(cfg)


def _add_experiment_flags(parser: argparse.ArgumentParser, dataset: str) -> None:
  parser.add_argument("--no-ensemble", dest="save_ensemble", action="store_false",
                      help="do not save the trained models in OUT/ensemble/ (the deployable "
                           "ensemble: `python -m ensemble_fl certify --ensemble OUT/ensemble` "
                           "certifies new inputs with it)")
  parser.add_argument("--rankings", dest="keep_rankings", action="store_true",
                      help="also save every model's ranking of the labels on every test input "
                           "in predictions.npz (model_rankings, C bytes a model and input, from "
                           "the same forward pass): `python -m ensemble_fl certify --predictions "
                           "OUT/predictions.npz --mode runoff` then certifies the run-off vote")


def _run_experiment(job, ctx: Context) -> results.ExperimentResult:
  cfg, data = job
  return experiment.run(cfg, data=data, timings=ctx.timings, checkpoint_dir=ctx.checkpoint_dir,
                        progress_factory=ctx.progress_factory, log=ctx.log,
                        keep_ensemble=ctx.args.save_ensemble,
                        keep_rankings=ctx.args.keep_rankings)


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
      status=_experiment_status, add_flags=_add_experiment_flags,
      nonfinite_flag=True, planned_results=lambda cfg, args: {".": cfg})


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
  # The swept field takes its first value, not the preset's: the preset's
  # (e.g. N = 500 on HAR's 30 clients in partition mode) is never run.
  defaults[SWEEP_PARAMS[args.param]] = _sweep_values(args)[0]
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


def _sweep_planned_results(cfg: ExperimentConfig, args) -> dict[str, ExperimentConfig]:
  values = _sweep_values(args)
  configs = experiment.sweep_configs(cfg, SWEEP_PARAMS[args.param], values)
  return {f"{args.param}={value}": c for value, c in zip(values, configs)}


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
    nonfinite_flag=True, planned_results=_sweep_planned_results)


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


# ---------------------------------------------------------------------------
# python -m ensemble_fl certify | remove: the deployed ensemble.
# ---------------------------------------------------------------------------


def _load_array(path: Path, what: str, key: str | None = None):
  """An array from a ``.npy`` file (or ``key`` of an ``.npz``), never unpickled."""
  try:
    with open(path, "rb"):
      pass
    loaded = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{what} {path}: cannot read it as a NumPy file ({e})") from None
  if key is None:
    if not isinstance(loaded, np.ndarray):
      raise ValueError(f"{what} {path}: expected one array (.npy), got an .npz archive")
    return loaded
  if isinstance(loaded, np.ndarray):
    raise ValueError(f"{what} {path}: expected a run's predictions.npz, got one array (.npy)")
  with loaded:
    if key not in loaded.files:
      raise ValueError(f"{what} {path} holds no {key!r} (it has {', '.join(loaded.files)})")
    return {name: loaded[name] for name in loaded.files}


def _labels_for(labels, d: int, num_classes: int, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (d,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be integer labels [{d}] (one per input), got "
                     f"{labels.dtype} {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes})")
  return labels.astype(np.int64)


def _certify_parser() -> ArgumentParser:
  p = ArgumentParser(
      prog="python -m ensemble_fl certify",
      description="Label and certify inputs with a saved ensemble (OUT/ensemble of any run), "
                  "or certify a run's saved votes again in another mode, without retraining. "
                  "Writes certificates.csv (one row per input) and certificates.json.")
  p.add_argument("--ensemble", type=Path,
                 help="the saved ensemble folder (default with --predictions: the run's "
                      "ensemble/ beside it)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--inputs", type=Path, metavar="FILE.npy",
                   help="float inputs [d, *feature_shape] (MNIST: [d, 28, 28, 1], pixels / 255)")
  src.add_argument("--predictions", type=Path, metavar="FILE.npz",
                   help="a run's predictions.npz: certify its models' votes again")
  p.add_argument("--labels", type=Path, metavar="FILE.npy",
                 help="true labels [d]: adds CA@m (default with --predictions: its y_true)")
  p.add_argument("--mode", choices=("exact", "deterministic", "partition", "monte_carlo",
                                    "runoff"),
                 help="the certificate (default: exact for a complete exact plan, else "
                      "deterministic: the deployed vote); runoff: the deployed two-round vote "
                      "of every model's ranking (with --inputs, or a predictions.npz that "
                      "holds model_rankings)")
  p.add_argument("--alpha", type=float,
                 help="monte_carlo only: 1 - confidence, for the d inputs at once (default 0.001)")
  p.add_argument("--batch-size", type=int, help="inputs per compiled call (default: predict's)")
  p.add_argument("--out", type=Path,
                 help="output folder, new or empty (default: a new results/certify-<timestamp>/)")
  p.add_argument("--overwrite", action="store_true", help="let --out hold files")
  return p


def _certificate_summary(cert, y_true, timings: dict[str, float]) -> tuple[dict, str]:
  """``certificates.json``'s body and the printed table."""
  levels = np.asarray(cert.levels)
  top = int(levels.max()) if levels.size else -1
  rows = results.table_rows(max(top + 1, 0))  # printed; the file has every m (a curve)
  every_m = np.arange(top + 2)
  certified = {int(m): float(np.mean(levels >= m)) for m in every_m}
  body = {"mode": cert.mode, "certifies": cert.guarantee, "num_models": cert.num_models,
          "num_inputs": cert.num_inputs, "abstained": int(np.sum(np.asarray(cert.labels) < 0)),
          "max_certified_level": top, "certified_share": certified,
          "timings_s": {k: float(v) for k, v in timings.items()}}
  header = "   m  certified"
  lines = []
  ca = None
  if y_true is not None:
    ca = dict(zip(every_m.tolist(), certify_lib.certified_accuracy(cert, y_true, every_m)))
    # The deployed vote's label (run-off: round 2's winner, not round 1's plurality).
    voted = cert.labels if cert.mode == "runoff" else cert.top_labels
    body["vote_accuracy"] = float(np.mean(np.asarray(voted) == y_true))
    if cert.mode == "runoff":
      body["plurality_accuracy"] = float(np.mean(np.asarray(cert.top_labels) == y_true))
    body["certified_accuracy"] = {int(m): float(a) for m, a in ca.items()}
    header += "   CA@m"
  for m in rows:
    lines.append(f"{m:4d}  {certified[m]:9.3f}" + ("" if ca is None else f"  {ca[m]:.3f}"))
  text = (f"{cert.num_inputs} inputs, {cert.num_models} models, {cert.mode} certificate; "
          f"largest level {top}\n{cert.guarantee}\n{header}\n" + "\n".join(lines))
  return body, text


def _write_certificates(out: Path, cert, y_true, body: dict) -> list[Path]:
  def write(staging: Path) -> list[Path]:
    csv_path, json_path = staging / "certificates.csv", staging / "certificates.json"
    columns = {"input": np.arange(cert.num_inputs), "label": cert.labels,
               "level": cert.levels, "vote": cert.top_labels, "top_count": cert.top_count,
               "runner_up_count": cert.runner_up_count}
    if y_true is not None:
      columns["y_true"] = y_true
    with open(csv_path, "w") as f:
      f.write(",".join(columns) + "\n")
      for row in zip(*(np.asarray(c).tolist() for c in columns.values())):
        f.write(",".join(map(str, row)) + "\n")
    results.write_json(json_path, body)
    return [csv_path, json_path]
  return results.publish(out, write)


def certify_main(argv: Sequence[str] | None = None) -> int:
  """``python -m ensemble_fl certify``: exit 0 done, 2 refused (one ``error:`` line)."""
  parser = _certify_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else EXIT_REFUSED
  out = created = claim = None
  timings: dict[str, float] = {}
  try:
    try:
      if args.alpha is not None and args.mode != "monte_carlo":
        raise ValueError("--alpha applies to --mode monte_carlo only")
      if args.batch_size is not None and args.inputs is None:
        raise ValueError("--batch-size applies to --inputs only (--predictions holds the votes)")
      folder = args.ensemble
      if folder is None:
        if args.predictions is None:
          raise ValueError("--inputs needs --ensemble (the saved ensemble folder)")
        folder = args.predictions.parent / results.ENSEMBLE_SUBDIR
        if not folder.is_dir():
          raise ValueError(f"no ensemble beside {args.predictions} ({folder}): name one with "
                           "--ensemble")
      with progress_lib.timed(timings, "load"):
        ens = deploy.load_ensemble(folder)
        mode = args.mode or ens.certificate_modes[0]
        if mode not in ens.certificate_modes:
          raise ValueError(f"--mode {mode} does not apply to this {ens.plan.mode} ensemble; it "
                           f"supports {', '.join(ens.certificate_modes)}")
        y_true = None
        if args.predictions is not None:
          key = "model_rankings" if mode == "runoff" else "model_labels"
          try:
            saved = _load_array(args.predictions, "--predictions", key)
          except ValueError as e:
            if mode == "runoff" and "holds no" in str(e):
              raise ValueError(f"{e}: the run-off vote needs every model's ranking; a run "
                               "saves them with --rankings, or certify --inputs predicts "
                               "them") from None
            raise
          votes = saved[key]
          if votes.ndim != (3 if mode == "runoff" else 2) or votes.shape[0] != ens.num_models:
            raise ValueError(f"--predictions holds {key} of shape {votes.shape}, the ensemble "
                             f"has {ens.num_models} models")
          d = votes.shape[1]
          if "y_true" in saved:
            y_true = saved["y_true"]
        else:
          x = deploy.check_inputs(_load_array(args.inputs, "--inputs"), ens.model.feature_shape)
          d = x.shape[0]
        if args.labels is not None:
          y_true = _load_array(args.labels, "--labels")
        if y_true is not None:
          y_true = _labels_for(y_true, d, ens.model.num_classes,
                               "--labels" if args.labels else "y_true")
      out, created, claim = prepare_out_dir(args.out, "certify", overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
      print(f"error: {_one_line(e, {})}", file=sys.stderr)
      return EXIT_REFUSED
    try:
      if args.inputs is not None:
        ballots = ens.predict_rankings if mode == "runoff" else ens.predict
        with progress_lib.timed(timings, "predict", _stderr_log):
          votes = ballots(x, batch_size=args.batch_size)
      with progress_lib.timed(timings, "certify"):
        cert = ens.certify_votes(votes, mode=mode,
                                 alpha=0.001 if args.alpha is None else args.alpha)
    except ValueError as e:
      print(f"error: {_one_line(e, {})}", file=sys.stderr)
      return EXIT_REFUSED
    except KeyboardInterrupt:
      print("\ninterrupted: nothing written", file=sys.stderr)
      return EXIT_INTERRUPTED
    body, text = _certificate_summary(cert, y_true, timings)
    body.update(ensemble=str(folder), fingerprint=ens.fingerprint,
                source=str(args.inputs or args.predictions),
                created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
      paths = _write_certificates(out, cert, y_true, body)
    except OSError as e:
      print(f"error: {os_error_line(e, out)}", file=sys.stderr)
      return EXIT_WRITE_FAILED
    print(text)
    print(f"outputs: {', '.join(map(str, paths))}")
    return 0
  finally:
    release_out_dir(out, created, claim)


def _remove_parser() -> ArgumentParser:
  p = ArgumentParser(
      prog="python -m ensemble_fl remove",
      description="Remove clients from a saved ensemble (found malicious, or asking to be "
                  "forgotten): retrains only the models that hold them, on their subsets "
                  "without them, keeps every other model bit for bit, and saves the new "
                  "ensemble, whose plan gives the deployed vote's exact certificate.")
  p.add_argument("--ensemble", type=Path, required=True, help="the saved ensemble folder")
  p.add_argument("--clients", type=_list_of(int), required=True, metavar="ID[,ID...]",
                 help="client ids to remove")
  p.add_argument("--out", type=Path, required=True,
                 help="the new ensemble's folder, new or empty")
  p.add_argument("--overwrite", action="store_true",
                 help="let --out hold files (it may be --ensemble itself: replaced only once "
                      "the new ensemble is whole)")
  p.add_argument("--data-dir", help="data root (default: the one the run used)")
  p.add_argument("--chunk-size", type=int, help="models trained at once (default: the trainer's)")
  return p


def remove_main(argv: Sequence[str] | None = None) -> int:
  """``python -m ensemble_fl remove``: exit 0 done, 2 refused (one ``error:`` line)."""
  parser = _remove_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else EXIT_REFUSED
  try:
    ens = deploy.load_ensemble(args.ensemble)
    recorded = ens.metadata.get("experiment_config")
    if not isinstance(recorded, dict):
      raise ValueError(f"{args.ensemble} does not record the run that trained it, so its data "
                       "cannot be reloaded here: use ensemble_fl.deploy.remove_clients")
    if args.out.exists() and not args.out.is_dir():
      raise ValueError(f"--out {args.out} is a file, not a folder")
    if (args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite):
      raise ValueError(f"--out {args.out} already holds files: name a new or empty folder, or "
                       "pass --overwrite")
    cfg = ExperimentConfig(**{**recorded, **({"data_dir": args.data_dir} if args.data_dir
                                             else {})})
    deploy._client_ids(args.clients, ens.n, ens.removed)  # refuse bad ids before loading data
    data = experiment.load_data(cfg)
    touched = int(np.isin(ens.plan.subsets, args.clients).any(axis=1).sum())
    _stderr_log(f"removing clients {','.join(map(str, args.clients))}: retraining {touched} of "
                f"{ens.num_models} models")
    new = deploy.remove_clients(ens, args.clients, data.clients, chunk_size=args.chunk_size,
                                progress=progress_lib.ProgressBar(f"retraining ({touched} models)"))
    path = new.save(args.out, overwrite=args.overwrite)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"error: {_one_line(e, {})}", file=sys.stderr)
    return EXIT_REFUSED
  except OSError as e:  # the new ensemble is written aside and renamed: nothing half-made
    print(f"error: {os_error_line(e, args.out)}", file=sys.stderr)
    return EXIT_WRITE_FAILED
  except KeyboardInterrupt:
    print("\ninterrupted: nothing written", file=sys.stderr)
    return EXIT_INTERRUPTED
  print(f"{new.num_models} models ({ens.num_models - new.num_models} dropped, {touched} "
        f"retrained); removed so far: {','.join(map(str, new.removed))}; certificates: "
        f"{', '.join(new.certificate_modes)}")
  print(f"outputs: {path}")
  return 0


SUBCOMMANDS = {"certify": certify_main, "remove": remove_main}


def package_main(argv: Sequence[str] | None = None) -> int:
  """``python -m ensemble_fl {certify,remove} ...``."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in SUBCOMMANDS:
    print("usage: python -m ensemble_fl {certify,remove} ... (--help after either for its flags)",
          file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if argv and argv[0] in ("-h", "--help") else EXIT_REFUSED
  return SUBCOMMANDS[argv[0]](argv[1:])
