"""Which plan and which vote certify most at the same training cost (issue #23).

Trains, on the same MNIST clients (or HAR's users, with --dataset har), one
ensemble per plan at equal cost (N models, n*s/N clients a model, every client
in s models on average), labels the test set with every model's ranking, and
certifies the deployed vote of each (plan public, no probability): plurality
("deterministic") and the two-round vote ("runoff"). Writes plan_compare.csv
(CA@m, one column per plan and vote), plan_compare.json (the settings, vote
accuracy and timings) and plan_compare.png.

Usage:
  python experiments/plan_compare.py --n 200 --N 100 --s 5 --test-size 2000 \
      --checkpoint-root runs/plan-ckpt --out runs/plan-compare

Plans:
  replicated: s independent partitions into N/s groups (every client in s models).
  cyclic: n clients in N buckets, model j on buckets j..j+s-1 mod N (every client in s models).
  monte_carlo: N drawn (n*s/N)-subsets (every client in s models on average).

With --checkpoint-root each plan's trained chunks are kept in their own
subfolder and a rerun resumes them (the fingerprint refuses another setting).
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from ensemble_fl import budget, certify, cli, config, ensemble, experiment, plotting, results

PLANS = budget.PLANS
VOTES = ("deterministic", "runoff")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--N", type=int, default=100, help="models of every plan")
  p.add_argument("--s", type=int, default=5, help="models each client trains")
  p.add_argument("--plans", default=",".join(PLANS), help=f"from {','.join(PLANS)}")
  cli.add_plan_study_flags(p, mnist_test_size=2000)
  args = p.parse_args(argv)
  plans = args.plans.split(",")
  try:
    if not plans or any(x not in PLANS for x in plans):
      raise ValueError(f"--plans must name some of {PLANS}, got {args.plans!r}")
    cli.complete_plan_study_args(args)
    if args.N % args.s or (args.n * args.s) % args.N:
      raise ValueError("--N must be divisible by --s and --n * --s by --N (equal cost per model)")
    # The plan is made here, not from cfg.
    cfg = cli.plan_study_config(args, k=args.n * args.s // args.N, num_models=args.N,
                                mode="deterministic")
    out, created, claim = cli.prepare_out_dir(args.out, "plan-compare")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    data = experiment.load_data(cfg)
    model = experiment.make_model(cfg.dataset, data.num_classes, data.x_test.shape[1:])
    curves, summary = {}, {"settings": {**vars(args), "out": str(out),
                                        "checkpoint_root": str(args.checkpoint_root)},
                           "config": dataclasses.asdict(cfg), "plans": {}}
    for name in plans:
      plan = budget.budget_plan(name, args.n, args.n * args.s, args.N, args.seed)
      ckpt = None if args.checkpoint_root is None else str(args.checkpoint_root / name)
      t0 = time.perf_counter()
      print(f"{name}: training {plan.num_models} models ...", file=sys.stderr, flush=True)
      params = ensemble.train_ensemble(model.init_fn, model.apply_fn, data.clients, plan,
                                       config.fedavg_config(cfg), checkpoint_dir=ckpt,
                                       nonfinite="raise")
      t1 = time.perf_counter()
      ranks = ensemble.predict_rankings(model.predict_fn, params, data.x_test,
                                        nonfinite="raise",
                                        copies=ensemble.distinct_subsets(plan)[1])
      t2 = time.perf_counter()
      info = {"train_s": t1 - t0, "predict_s": t2 - t1,
              "models_per_client": np.bincount(plan.subsets[plan.subsets >= 0],
                                               minlength=args.n).tolist()}
      for vote in VOTES:
        cert = certify.certify(ranks[..., 0], num_classes=data.num_classes, n=args.n,
                               mode=vote, subsets=plan.subsets,
                               rankings=ranks if vote == "runoff" else None)
        m = np.arange(int(np.max(cert.levels)) + 2)
        curves[f"{name} {vote}"] = (m, np.asarray(certify.certified_accuracy(
            cert, data.y_test, m), np.float64))
        info[vote] = {"vote_accuracy": float(np.mean(cert.labels == data.y_test)),
                      "mean_level": float(np.mean(cert.levels)), "certifies": cert.guarantee}
      summary["plans"][name] = info
      print(f"{name}: train {t1 - t0:.0f} s, predict {t2 - t1:.0f} s", file=sys.stderr,
            flush=True)

    def write(staging: Path):
      top = max(len(m) for m, _ in curves.values())
      csv = staging / "plan_compare.csv"
      with open(csv, "w") as f:
        f.write("m," + ",".join(c.replace(" ", "_") for c in curves) + "\n")
        for m in range(top):
          f.write(f"{m}," + ",".join(f"{ca[m]:.4f}" if m < len(ca) else "0.0000"
                                     for _, ca in curves.values()) + "\n")
      paths = [csv]
      results.write_json(staging / "plan_compare.json", summary)
      paths.append(staging / "plan_compare.json")
      png = plotting.plot_curves(staging / "plan_compare.png",
                                 [(k, m, ca) for k, (m, ca) in curves.items()],
                                 title=f"{config.DATASETS[cfg.dataset].display_name}, n={args.n}, "
                                       f"N={args.N}, s={args.s}: deployed vote")
      if png is not None:
        paths.append(png)
      return paths
    for path in results.publish(out, write):
      print(f"wrote {path}")
    return 0
  finally:
    cli.release_out_dir(out, created, claim)


if __name__ == "__main__":
  sys.exit(main())
