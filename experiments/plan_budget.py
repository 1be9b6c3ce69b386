"""Choose N and the plan from a training budget, and check the choice (issue #23).

A budget of n*s client-model slots over n MNIST clients (or HAR's 30 users, with
--dataset har) can buy N models of c = n*s/N clients each, for any N dividing
it. This script

1. pilots every candidate group size c with a few models (Monte Carlo
   c-subsets, --pilot-models of them: a small share of the budget),
2. fits the vote model of ensemble_fl.budget on the pilot's test-set labels
   and ranks every (plan, N) by its predicted CA at --levels (the deployed
   vote, plan public),
3. with --measure, trains every candidate of the measured plans in full,
   certifies its deployed vote and ranks them again by what was measured.

Writes plan_budget.csv (one row per plan and N: the distinct models among the
N, the only ones worth training since equal subsets train equal models;
predicted and measured CA at each level and the score, their mean),
plan_budget.json (settings, the recommendation, the measured optimum, pilot and
training costs, timings) and plan_budget.png (score against N, predicted and
measured).

Usage:
  python experiments/plan_budget.py --n 200 --s 5 --N 20,50,100,200 --levels 2,5,10 \\
      --measure replicated --checkpoint-root runs/budget-ckpt --out runs/plan-budget

With --checkpoint-root every pilot and measured ensemble keeps its trained
chunks in its own subfolder, and a rerun resumes them.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from ensemble_fl import budget, certify, cli, config, ensemble, experiment, plotting, results


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--s", type=int, default=5, help="models a client trains (budget n*s)")
  p.add_argument("--N", default="20,50,100,200", help="candidate numbers of models")
  p.add_argument("--levels", default="2,5,10", help="the m the score averages CA@m over")
  p.add_argument("--plans", default=",".join(budget.PLANS), help="plans to predict")
  p.add_argument("--measure", default="", help="plans to train in full and certify")
  p.add_argument("--pilot-models", type=int, default=8, help="pilot models a group size")
  p.add_argument("--draws", type=int, default=3, help="vote draws a prediction averages")
  cli.add_plan_study_flags(p, mnist_test_size=1000)
  args = p.parse_args(argv)
  try:
    cli.complete_plan_study_args(args)
    sizes, levels = _ints(args.N), _ints(args.levels)
    plans = [x for x in args.plans.split(",") if x]
    measured_plans = [x for x in args.measure.split(",") if x]
    spend = args.n * args.s
    if not sizes or any(spend % v for v in sizes):
      raise ValueError(f"every --N must divide the budget n*s = {spend}, got {args.N}")
    if not levels or min(levels) < 0:
      raise ValueError(f"--levels must be numbers m >= 0, got {args.levels!r}")
    for name in plans + measured_plans:
      if name not in budget.PLANS:
        raise ValueError(f"plans must be some of {budget.PLANS}, got {name!r}")
    if args.pilot_models < 2:
      raise ValueError("--pilot-models must be >= 2")
    for name in measured_plans:  # refuse a plan the budget cannot buy before any training
      for v in sizes:
        budget.budget_plan(name, args.n, spend, v, args.seed)
    cfg = cli.plan_study_config(args, k=1, num_models=1, mode="deterministic")
    out, created, claim = cli.prepare_out_dir(args.out, "plan-budget")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    data = experiment.load_data(cfg)
    model = experiment.make_model(cfg.dataset, data.num_classes, data.x_test.shape[1:])
    fedavg = config.fedavg_config(cfg)
    timings = {}

    def labels_of(plan, name):
      ckpt = None if args.checkpoint_root is None else str(args.checkpoint_root / name)
      t0 = time.perf_counter()
      print(f"{name}: training {plan.num_models} models ...", file=sys.stderr, flush=True)
      params = ensemble.train_ensemble(model.init_fn, model.apply_fn, data.clients, plan, fedavg,
                                       checkpoint_dir=ckpt, nonfinite="raise")
      labels = ensemble.predict(model.predict_fn, params, data.x_test, nonfinite="raise",
                                copies=ensemble.distinct_subsets(plan)[1])
      timings[name] = time.perf_counter() - t0
      print(f"{name}: {timings[name]:.0f} s", file=sys.stderr, flush=True)
      return labels

    pilot = {}
    for v in sizes:
      c = spend // v
      plan = ensemble.make_plan("monte_carlo", n=args.n, k=c, num_models=args.pilot_models,
                                seed=args.seed + 1000 + c)  # not any candidate's plan
      pilot[c] = labels_of(plan, f"pilot-c{c}")
    votes = budget.fit_vote_model(pilot, data.y_test, data.num_classes)
    ranked = budget.recommend(votes, n=args.n, budget=spend, levels=levels, plans=plans,
                              draws=args.draws, seed=args.seed)
    rows = {(r.plan, r.num_models): {"plan": r.plan, "N": r.num_models, "c": r.group_size,
                                     "distinct": r.distinct_models,
                                     "predicted": list(r.predicted), "predicted_score": r.score}
            for r in ranked}
    for name in measured_plans:
      for v in sizes:
        plan = budget.budget_plan(name, args.n, spend, v, args.seed)
        labels = labels_of(plan, f"{name}-N{v}")
        cert = certify.certify(labels, num_classes=data.num_classes, n=args.n,
                               mode="deterministic", subsets=plan.subsets)
        ca = np.asarray(certify.certified_accuracy(cert, data.y_test, levels), np.float64)
        row = rows.setdefault((name, v), {"plan": name, "N": v, "c": spend // v,
                                          "distinct": ensemble.distinct_subsets(plan)[0]})
        row.update(measured=ca.tolist(), measured_score=float(ca.mean()))
    table = sorted(rows.values(), key=lambda r: (r["plan"], r["N"]))
    best_measured = max((r for r in table if "measured" in r),
                        key=lambda r: (r["measured_score"], -r["N"]), default=None)
    recommended = rows[(ranked[0].plan, ranked[0].num_models)]
    summary = {
        "settings": {**vars(args), "out": str(out), "checkpoint_root": str(args.checkpoint_root),
                     "budget": spend},
        "config": dataclasses.asdict(cfg),
        "vote_model": {"pseudo_counts": {str(c): b for c, b in votes.pseudo_counts.items()}},
        "recommended": recommended, "measured_optimum": best_measured,
        "pilot_slots": args.pilot_models * sum(pilot),
        "measured_slots": spend * len(sizes) * len(measured_plans),
        "rows": table, "timings_s": timings,
    }
    if best_measured is not None and "measured" in recommended:
      summary["recommended_measured_score_gap"] = (best_measured["measured_score"]
                                                   - recommended["measured_score"])

    def write(staging: Path):
      csv = staging / "plan_budget.csv"
      with open(csv, "w") as f:
        heads = [f"{kind}_ca@{m}" for kind in ("predicted", "measured") for m in levels]
        f.write("plan,N,c,distinct," + ",".join(heads) + ",predicted_score,measured_score\n")
        for r in table:
          cells = [f"{x:.4f}" for x in r.get("predicted", [np.nan] * len(levels))]
          cells += [f"{x:.4f}" for x in r.get("measured", [np.nan] * len(levels))]
          cells += [f"{r.get(k, np.nan):.4f}" for k in ("predicted_score", "measured_score")]
          f.write(f"{r['plan']},{r['N']},{r['c']},{r['distinct']}," + ",".join(cells) + "\n")
      results.write_json(staging / "plan_budget.json", summary)
      paths = [csv, staging / "plan_budget.json"]
      curves = []
      for name in sorted({r["plan"] for r in table}):
        for kind in ("predicted", "measured"):
          pts = [(r["N"], r[f"{kind}_score"]) for r in table
                 if r["plan"] == name and f"{kind}_score" in r]
          if pts:
            curves.append((f"{name} {kind}", *map(np.asarray, zip(*pts))))
      png = plotting.plot_curves(staging / "plan_budget.png", curves, xlabel="models N",
                                 ylabel=f"mean CA at m = {args.levels}",
                                 title=f"{config.DATASETS[cfg.dataset].display_name}, "
                                       f"n={args.n}, budget n*s={spend}")
      if png is not None:
        paths.append(png)
      return paths

    for path in results.publish(out, write):
      print(f"wrote {path}")
    print(f"recommended: {recommended['plan']} N = {recommended['N']} (c = {recommended['c']}), "
          f"predicted score {recommended['predicted_score']:.4f}")
    if best_measured is not None:
      print(f"measured optimum: {best_measured['plan']} N = {best_measured['N']}, score "
            f"{best_measured['measured_score']:.4f}")
    return 0
  finally:
    cli.release_out_dir(out, created, claim)


if __name__ == "__main__":
  sys.exit(main())
