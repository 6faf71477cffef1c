"""Exact convergence of every variant on the enumerable toy testbed (method.md §6).

Every completion of the toy prompt is enumerated, so KL(q* || q_theta) and the success rate of q_theta
are exact sums. Two experiments:

1. Samples from p: train each variant on 1k .. 64k exact i.i.d. samples from the base model and report
   KL / success per budget (Table 1, with training wall time) and a figure of KL against the budget.
2. Importance sampling: use each variant's guide trained on the smallest budget as a proposal, draw
   samples from it with the real sampler (``dinado.sample``, which records log p - log pi), train a fresh
   guide on them with and without the importance weights, and compare with a guide trained on the same
   number of samples from p (Table 2).

Samples from p come from ``ExactResult.draw``, a multinomial draw over the enumerated completions with
their exact probabilities: equivalent in distribution to ancestral sampling from the base, and used here
only because it is faster. The budgets are nested (the first n of one draw), so a larger budget always
contains the smaller ones.

Markdown tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import dinado
from dinado import exact
from dinado._utils import atomic_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.common
from benchmarks.common import logger, markdown_table, pooled_ess  # noqa: E402

log = logger()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIGURE = REPO_ROOT / "docs" / "figures" / "exact_kl_vs_samples.png"

BASE_SEED = 3  # the testbed's base model: toy_base(3, init_scale=0.3)
BASE_INIT_SCALE = 0.3
MAX_NEW_TOKENS = 6
EOS = exact.TOY_EOS
PROMPT = list(exact.TOY_PROMPT)
ORACLE = exact.toy_oracle

FULL = {"budgets": [1000, 4000, 16000, 64000], "steps": 1500, "proposal_samples": 4000}
QUICK = {"budgets": [1000, 4000], "steps": 300, "proposal_samples": 1000}


@dataclass
class Fit:
    """One trained guide, evaluated exactly."""

    kl: float
    success: float
    train_seconds: float

    def cell(self) -> str:
        return f"{self.kl:.3f} / {100 * self.success:.1f}%"


@dataclass
class ImportanceRow:
    variant: str
    proposal_success: float  # exact success rate of the proposal q_theta
    positives: int  # positive samples among the proposal's draws
    num_samples: int
    ess: float  # (sum w)^2 / sum w^2 of the self-normalised weights
    sample_seconds: float
    weighted: Fit
    unweighted: Fit
    from_p: Fit


def source_fingerprint() -> str:
    """A short hash of the dinado sources this process imported (src/ may change between runs)."""
    digest = hashlib.sha256()
    for path in sorted(Path(dinado.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=None,
        help=f"sample budgets from p (default {FULL['budgets']}; quick {QUICK['budgets']})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per guide (default {FULL['steps']}; quick {QUICK['steps']})",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="training learning rate (default: dinado.train's default for each variant)",
    )
    parser.add_argument("--variants", nargs="+", default=list(dinado.VARIANTS), choices=dinado.VARIANTS)
    parser.add_argument(
        "--proposal-samples",
        type=int,
        default=None,
        help="samples drawn from each proposal for Table 2 "
        f"(default {FULL['proposal_samples']}; quick {QUICK['proposal_samples']})",
    )
    parser.add_argument("--sample-batch-size", type=int, default=1000, help="dinado.sample batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data draws, guide init and training")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the models are tiny, and extra threads collapse when "
        "another process competes for the cores)",
    )
    parser.add_argument(
        "--figure",
        type=Path,
        default=None,
        help=f"PNG to write (default {DEFAULT_FIGURE.relative_to(REPO_ROOT)}; none with --quick)",
    )
    parser.add_argument("--no-figure", action="store_true", help="do not draw the figure")
    parser.add_argument("--skip-importance", action="store_true", help="only run Table 1")
    parser.add_argument("--quick", action="store_true", help="a fast smoke test: fewer budgets and steps")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.budgets = sorted(set(args.budgets))
    if args.figure is None and not args.quick:
        args.figure = DEFAULT_FIGURE
    if args.no_figure:
        args.figure = None
    return args


def fresh_guide(variant: str, seed: int) -> dinado.Guide:
    """A new guide over a fresh copy of the testbed's base (fixed seed); ``seed`` sets the guide's init."""
    base = exact.toy_base(BASE_SEED, init_scale=BASE_INIT_SCALE)
    torch.manual_seed(seed)
    return dinado.Guide.create(base, variant)


def evaluate(guide: dinado.Guide) -> exact.ExactResult:
    return exact.evaluate(guide, PROMPT, ORACLE, MAX_NEW_TOKENS, EOS)


def fit(
    variant: str, samples: dinado.SampleSet, args: argparse.Namespace, use_weights: bool = True
) -> tuple[dinado.Guide, Fit]:
    guide = fresh_guide(variant, args.seed)
    report = dinado.train(
        guide,
        samples,
        max_steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        use_weights=use_weights,
        learning_rate=args.learning_rate,
    )
    result = evaluate(guide)
    return guide, Fit(result.kl_q_star_q, result.success_q, report.wall_seconds)


def budget_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def save_figure(
    path: Path,
    budgets: Sequence[int],
    table: dict[str, dict[int, Fit]],
    kl_p: float,
    success_p: float,
    steps: int,
) -> None:
    """KL and success against the number of samples from p; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_success) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for variant, fits in table.items():
        ax_kl.plot(budgets, [fits[n].kl for n in budgets], marker="o", label=variant)
        ax_success.plot(budgets, [100 * fits[n].success for n in budgets], marker="o", label=variant)
    ax_kl.axhline(kl_p, color="black", linestyle="--", linewidth=1, label=f"base p ({kl_p:.2f})")
    ax_success.axhline(
        100 * success_p, color="black", linestyle="--", linewidth=1, label=f"base p ({100 * success_p:.1f}%)"
    )
    for ax in (ax_kl, ax_success):
        ax.set_xscale("log")
        ax.set_xticks(list(budgets), [budget_label(n) for n in budgets])
        ax.minorticks_off()
        ax.set_xlabel("samples from p")
        ax.grid(True, alpha=0.3)
    ax_kl.set_ylabel("KL(q* || q_theta)  [nats, exact]")
    ax_kl.set_ylim(bottom=0)
    ax_success.set_ylabel("success under q_theta  [%, exact]")
    ax_success.set_ylim(0, 100)
    ax_kl.legend(fontsize=8)
    fig.suptitle(f"Exact testbed (toy_base(3), 6 new tokens): {steps} steps of batch 256 per budget")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def run_from_p(
    args: argparse.Namespace, pool: dinado.SampleSet
) -> tuple[dict[str, dict[int, Fit]], dict[str, dinado.Guide]]:
    """Table 1: every variant on every budget. Also returns the guides of the smallest budget."""
    table: dict[str, dict[int, Fit]] = {v: {} for v in args.variants}
    smallest: dict[str, dinado.Guide] = {}
    for n in args.budgets:
        subset = pool.subset(range(n))
        for variant in args.variants:
            guide, result = fit(variant, subset, args)
            table[variant][n] = result
            if n == args.budgets[0]:
                smallest[variant] = guide
            log(f"[p {budget_label(n)}] {variant}: {result.cell()} ({result.train_seconds:.1f} s)")
    return table, smallest


def run_importance(
    args: argparse.Namespace,
    pool: dinado.SampleSet,
    proposals: dict[str, dinado.Guide],
    table: dict[str, dict[int, Fit]],
) -> list[ImportanceRow]:
    """Table 2: proposal samples with and without importance weights against samples from p."""
    n = args.proposal_samples
    rows = []
    for variant in args.variants:
        proposal = proposals[variant]
        proposal_success = evaluate(proposal).success_q
        start = time.perf_counter()
        samples = dinado.sample(
            proposal,
            [PROMPT],
            num_samples=n,
            oracle=ORACLE,
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=args.sample_batch_size,
            seed=args.seed + 1,
        )
        sample_seconds = time.perf_counter() - start
        _, weighted = fit(variant, samples, args, use_weights=True)
        _, unweighted = fit(variant, samples, args, use_weights=False)
        from_p = table[variant].get(n)
        if from_p is None:  # the same number of samples from p, when it is not one of Table 1's budgets
            _, from_p = fit(variant, pool.subset(range(n)), args)
        row = ImportanceRow(
            variant=variant,
            proposal_success=proposal_success,
            positives=int(samples.labels.sum()),
            num_samples=n,
            ess=pooled_ess(samples),
            sample_seconds=sample_seconds,
            weighted=weighted,
            unweighted=unweighted,
            from_p=from_p,
        )
        rows.append(row)
        log(
            f"[IS] {variant}: weighted {weighted.cell()}, unweighted {unweighted.cell()}, p {from_p.cell()}, "
            f"ESS {row.ess:.0f}/{n}, sampling {n / sample_seconds:.0f} samples/s"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"Command: `{shlex.join([sys.executable, *sys.argv])}`\n")
    print(
        f"dinado {dinado.__version__} (sources {source_fingerprint()}), torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}; steps {args.steps}, batch {args.batch_size}, "
        f"seed {args.seed}, learning rate {args.learning_rate or 'default'}\n"
    )
    overall = time.perf_counter()

    reference = evaluate(fresh_guide(args.variants[0], args.seed))  # q_theta = p at initialisation
    kl_p, success_p = reference.kl_q_star_p, reference.success_p
    pool_size = max(args.budgets[-1], args.proposal_samples)
    pool = reference.draw(pool_size, PROMPT, seed=args.seed)
    positives = {n: int(pool.labels[:n].sum()) for n in args.budgets}
    log(f"base p: KL(q*||p) = {kl_p:.4f}, success {100 * success_p:.2f}%, mass check {reference.mass_p:.6f}")

    table, smallest = run_from_p(args, pool)
    headers = ["variant", *(f"{budget_label(n)} samples" for n in args.budgets)]
    kl_rows = [["base p (no guide)", *(f"{kl_p:.3f} / {100 * success_p:.1f}%" for _ in args.budgets)]]
    kl_rows += [[v, *(table[v][n].cell() for n in args.budgets)] for v in args.variants]
    kl_rows.append(["positives in the sample", *(str(positives[n]) for n in args.budgets)])
    print(f"## Table 1: KL(q* || q_theta) / success of q_theta (exact), {args.steps} steps, samples from p\n")
    print(markdown_table(headers, kl_rows))
    time_rows = [[v, *(f"{table[v][n].train_seconds:.1f}" for n in args.budgets)] for v in args.variants]
    print("\nTraining wall time per cell (seconds):\n")
    print(markdown_table(headers, time_rows))

    if args.figure is not None:
        save_figure(args.figure, args.budgets, table, kl_p, success_p, args.steps)
        shown = args.figure.resolve()
        print(f"\nFigure: {shown.relative_to(REPO_ROOT) if shown.is_relative_to(REPO_ROOT) else shown}")

    if not args.skip_importance:
        rows = run_importance(args, pool, smallest, table)
        n = args.proposal_samples
        first = budget_label(args.budgets[0])
        print(
            f"\n## Table 2: importance sampling. Proposal = the guide trained on {first} samples from p; "
            f"{budget_label(n)} samples from it (dinado.sample) vs {budget_label(n)} from p; "
            f"{args.steps} steps each\n"
        )
        header = [
            "variant",
            "proposal success (exact)",
            "positives / samples",
            "ESS of weights",
            "IS-weighted",
            "unweighted",
            f"{budget_label(n)} from p",
        ]
        body = [
            [
                r.variant,
                f"{100 * r.proposal_success:.1f}%",
                f"{r.positives} / {r.num_samples}",
                f"{r.ess:.0f} ({100 * r.ess / r.num_samples:.0f}%)",
                r.weighted.cell(),
                r.unweighted.cell(),
                r.from_p.cell(),
            ]
            for r in rows
        ]
        print(markdown_table(header, body))
        print("\nCells: KL(q* || q_theta) / success of q_theta, both exact. Sampling speed (dinado.sample):")
        print(", ".join(f"{r.variant} {r.num_samples / r.sample_seconds:.0f} samples/s" for r in rows))
    print(f"\nTotal wall time: {time.perf_counter() - overall:.0f} s")


if __name__ == "__main__":
    main()
