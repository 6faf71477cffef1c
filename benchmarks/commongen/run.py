"""CommonGen end to end: every dinado variant side by side with baselines, on real data, in one command.

    python benchmarks/commongen/run.py --quick --output runs/commongen-quick        # <= 15 min on 2 cores
    python benchmarks/commongen/run.py --base runs/cg-base --output runs/commongen    # the full run

Stages (each one's wall time is recorded):

1. base: ``--base`` (a local directory or a hub id of any causal LM trained on ``concepts = sentence``; with
   ``--base-finetune-steps N`` a raw LM such as gpt2-large is first LoRA-fine-tuned on the references and
   merged), or, without ``--base``, a small GPT-2 pretrained here with ``dinado.pretrain``.
2. sample: ``--samples-per-set`` completions from the base for each of ``--train-sets`` training concept sets
   (a seeded random subset of CommonGen train), labelled by the inflection-aware coverage oracle; with
   ``--proposal RUN`` they come from that run's merged DiNADO-Merge guide instead, importance-weighted.
3. train: NADO, DiNADO-Hard, DiNADO-Soft and DiNADO-Merge (LoRA) on those samples; the baselines: supervised
   LoRA fine-tuning and PEFT prompt tuning on the references of the same concept sets.
4. decode dev (and test) with beam search and with sampling; best-of-N rejection sampling (N = 4, 16) from the
   base; score coverage, all-concepts success, BLEU-4, CIDEr, METEOR, ROUGE-L (SPICE: unavailable).
5. sample efficiency: dev success against labelled samples per concept set ({1, 2, 4, 8}) for NADO and
   DiNADO-Soft, with samples from p and with importance-weighted samples from a proposal that satisfies the
   oracle more often: the supervised LoRA model, or p at ``--efficiency-temperature`` (no fine-tuning).

Writes ``results.json``, ``results.md`` (the tables) and ``efficiency.png`` to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from dinado import Guide, SampleSet, reference_samples, relabel, sample, sample_with_features, train
from dinado._utils import ADAM_EPSILON, atomic_write_text
from dinado.baselines import best_of_n, supervised_finetune
from dinado.evaluation import base_perplexity, save_figure
from dinado.hf import load_model
from dinado.oracles import as_token_oracle
from dinado.pretrain import PretrainConfig, pretrain
from dinado.tasks.commongen import INSTRUCTION, commongen_metrics, coverage_oracle, load_split
from dinado.text import PromptFormat, encode_prompts, end_of_turn_id, generate_texts

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import Timer, logger, mean_group_ess  # noqa: E402

log = logger("commongen", "stdout")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "commongen" / "v1.1_LHRYANG"
VARIANTS = ("nado", "dinado-hard", "dinado-soft", "dinado-merge")
BASELINES = ("sft-lora", "prompt-tuning")
DECODINGS = ("greedy", "beam", "sample")

# full run / --quick; any flag given on the command line wins
PRESETS = {
    "full": dict(
        train_sets=3000,
        samples_per_set=8,
        train_batch_size=64,
        guide_steps=400,
        sft_steps=400,
        dev_sets=0,  # 0 = the whole split
        test_sets=0,
        efficiency_sets=1000,
        efficiency_steps=150,
        efficiency_dev_sets=300,
        pretrain_examples=0,
        pretrain_layers=4,
        pretrain_embd=256,
        pretrain_vocab=8000,
        pretrain_steps=4000,
        pretrain_lr=1e-3,
    ),
    "quick": dict(
        train_sets=300,
        samples_per_set=8,
        train_batch_size=32,
        guide_steps=120,
        sft_steps=120,
        dev_sets=100,
        test_sets=100,
        efficiency_sets=150,
        efficiency_steps=60,
        efficiency_dev_sets=60,
        pretrain_examples=0,
        pretrain_layers=2,
        pretrain_embd=128,
        pretrain_vocab=4000,
        pretrain_steps=1500,
        pretrain_lr=2e-3,
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="run directory (created; results.json/results.md go here)")
    p.add_argument("--quick", action="store_true", help="the small preset (at most ~15 min on 2 CPU cores)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="CommonGen v1.1 files ({split}_src/trg.txt)")
    p.add_argument("--base", default=None, help="causal LM directory or hub id (default: pretrain one here)")
    p.add_argument(
        "--base-finetune-steps",
        type=int,
        default=0,
        help="LoRA-fine-tune --base on the references of all of train first (merged; saved to OUTPUT/base)",
    )
    p.add_argument(
        "--base-finetune-batch-size",
        type=int,
        default=32,
        help="rows per step of --base-finetune-steps (on a GPU, fewer larger batches: a small model's step is "
        "bound by kernel launches)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--guide-seed",
        type=int,
        default=None,
        help="seed of each guide's initial parameters (Guide.create(seed=...)); default: --seed",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on shared 2-core machines)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64, help="decoding/sampling batch (prompts)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument(
        "--no-repeat-ngram",
        type=int,
        default=0,
        help="beam search and greedy: no n-gram of this many tokens may occur twice in an output "
        "(transformers' no_repeat_ngram_size; against repetition loops); 0: off. Sampling is left as it is",
    )
    p.add_argument("--best-of", default="4,16", help="N for best-of-N rejection sampling, comma-separated")
    p.add_argument("--budgets", default="1,2,4,8", help="samples per concept set in the efficiency study")
    p.add_argument(
        "--prompt-template",
        default=None,
        help=f"prompt format ({{prompt}} = the 'concepts =' line, {{keywords}} = its concepts); default: "
        f"{INSTRUCTION!r} in the chat template's user turn for a base with one, else '{{prompt}}'",
    )
    p.add_argument("--chat", choices=("auto", "true", "false"), default="auto", help="use the chat template")
    p.add_argument("--systems", default=",".join(VARIANTS + BASELINES), help="guides and baselines to train")
    p.add_argument("--decodings", default=",".join(DECODINGS), help="greedy, beam, sample (comma-separated)")
    p.add_argument(
        "--guide-options",
        default="{}",
        help='JSON Guide.create options for the module variants, e.g. {"head": "tied"}',
    )
    p.add_argument(
        "--merge-options",
        default="{}",
        help="JSON Guide.create options for dinado-merge (default LoRA r 8, alpha 16 on every linear layer), e.g. "
        '{"lora_target_modules": ".*layers\\.2[4-9]\\..*_proj"} to adapt only the top layers (backward stops there)',
    )
    p.add_argument(
        "--labels",
        choices=("all", "soft"),
        default="all",
        help="the guides' training labels: 1 when every concept is covered (all), or the covered share (soft)",
    )
    p.add_argument(
        "--sentences-only",
        action="store_true",
        help="train the guides on labels that give 0 to comma-separated word lists whatever they cover "
        "(coverage_oracle(sentences_only=True)); the samples, best-of-N and the metrics keep the coverage oracle",
    )
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="train the guides on labels that give 0 to completions that do not end their sentence (cut by the "
        "token limit; coverage_oracle(finished_only=True)); the samples, best-of-N and the metrics keep the "
        "coverage oracle",
    )
    p.add_argument(
        "--unfinished-weight",
        type=float,
        default=0.0,
        help="with --finished-only: what an unfinished completion's label is multiplied by instead of 0, in [0, 1) "
        "(a soft penalty; coverage_oracle(unfinished_weight=...))",
    )
    p.add_argument(
        "--label-power",
        type=float,
        default=1.0,
        help="with --labels soft: train on the covered share raised to this power (q* ∝ p * share^k; a larger k "
        "tilts q* further towards covering every concept while keeping a dense signal; default 1)",
    )
    p.add_argument(
        "--references",
        type=int,
        default=0,
        help="add up to N references of each training concept set to the guides' samples, labelled by the "
        "training oracle and unweighted (the DiNADO authors' option; biases R upward; default 0 = off)",
    )
    p.add_argument("--guide-lr", type=float, default=None, help="guide learning rate (default: dinado's)")
    p.add_argument(
        "--guide-adam-epsilon",
        type=float,
        default=ADAM_EPSILON,
        help="AdamW's epsilon for every guide of the run (dinado.train(adam_epsilon=...); default torch's 1e-8; "
        "the headline DiNADO-Merge recipe and the demo's Merge run use 1e-4: docs/results/commongen.md)",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="guidance strength of the module variants")
    p.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="decode the module variants with candidate-restricted guidance: only p's top-K tokens (and the "
        "sequence's own) are guided (dinado.generate(..., candidates=K)); default: every token",
    )
    p.add_argument(
        "--merge-scale",
        type=float,
        default=1.0,
        help="DiNADO-Merge's strength: Guide.merge(adapter_scale=S) (choose it with strength.py, not on dev)",
    )
    p.add_argument(
        "--reuse-guides",
        default=None,
        help="decode the guides saved in this earlier run directory (<dir>/guides/<variant>) instead of training",
    )
    p.add_argument(
        "--samples", default=None, help="reuse this samples.safetensors (same base, sets and seed)"
    )
    p.add_argument(
        "--proposal",
        default=None,
        help="draw the guides' training samples from the DiNADO-Merge guide saved in this earlier run "
        "(<dir>/guides/dinado-merge, merged at --proposal-scale) instead of from p; each sample keeps its "
        "importance weight log p - log q, self-normalised per concept set in training (with --samples: "
        "those samples were drawn from it; its training samples are counted as oracle calls either way)",
    )
    p.add_argument(
        "--proposal-scale", type=float, default=1.0, help="the proposal's adapter scale (Guide.merge)"
    )
    p.add_argument(
        "--rows-json", default=None, help="also write the result rows in the docs/results format here"
    )
    p.add_argument("--no-test", action="store_true", help="decode dev only (= --splits dev)")
    p.add_argument(
        "--splits",
        default="dev,test",
        help="splits to decode, comma-separated (dev, test); e.g. test alone once dev has fixed the settings",
    )
    p.add_argument(
        "--no-base",
        action="store_true",
        help="do not decode the base itself (its rows come from another process; best-of-N is --best-of)",
    )
    p.add_argument("--no-efficiency", action="store_true", help="skip the sample-efficiency study")
    p.add_argument(
        "--efficiency-temperature",
        type=float,
        default=None,
        help="the efficiency study's proposal: p at this temperature (importance-weighted; no fine-tuning), "
        "instead of the supervised LoRA model",
    )
    p.add_argument(
        "--efficiency-alphas",
        default="",
        help="the efficiency study's guidance strength per module variant, e.g. 'nado=1,dinado-soft=4' (chosen "
        "beforehand, e.g. with strength.py; default: --alpha; DiNADO-Merge takes --merge-scale)",
    )
    p.add_argument(
        "--efficiency-variants",
        default="nado,dinado-soft",
        help=f"the guides of the efficiency study, comma-separated (of {', '.join(VARIANTS)})",
    )
    p.add_argument(
        "--efficiency-arms",
        default="p,proposal",
        help="the efficiency study's sample sources: p and/or proposal (comma-separated)",
    )
    p.add_argument(
        "--efficiency-only",
        action="store_true",
        help="run only the sample-efficiency study (e.g. in a second process beside --no-efficiency)",
    )
    for key, value in PRESETS["full"].items():
        flag = "--" + key.replace("_", "-")
        p.add_argument(
            flag, type=type(value), default=None, help=f"full: {value}, quick: {PRESETS['quick'][key]}"
        )
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.best_of = [int(x) for x in args.best_of.split(",") if x.strip()]
    args.systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    args.decodings = [x.strip() for x in args.decodings.split(",") if x.strip()]
    args.splits = [x.strip() for x in args.splits.split(",") if x.strip()]
    if args.no_test:
        args.splits = [x for x in args.splits if x != "test"]
    if not args.splits or set(args.splits) - {"dev", "test"} or len(set(args.splits)) < len(args.splits):
        p.error(f"--splits takes dev and/or test once each, got {','.join(args.splits) or 'none'}")
    if "dev" not in args.splits and (args.efficiency_only or not args.no_efficiency):
        p.error("the sample-efficiency study is scored on dev: add dev to --splits or pass --no-efficiency")
    if args.guide_seed is None:
        args.guide_seed = args.seed
    bad = sorted(set(args.systems) - set(VARIANTS + BASELINES)) + sorted(set(args.decodings) - set(DECODINGS))
    if bad:
        p.error(f"unknown systems or decodings {bad}: systems {VARIANTS + BASELINES}, decodings {DECODINGS}")
    if not args.guide_adam_epsilon > 0:
        p.error(f"--guide-adam-epsilon takes a positive number, got {args.guide_adam_epsilon:g}")
    if args.candidates is not None and args.candidates < 1:
        p.error(f"--candidates takes a positive number of tokens (p's top-K), got {args.candidates}")
    if args.no_repeat_ngram < 0:
        p.error(f"--no-repeat-ngram takes a number of tokens (0: off), got {args.no_repeat_ngram}")
    for flag in ("guide_options", "merge_options"):
        try:
            setattr(args, flag, json.loads(getattr(args, flag)))
        except json.JSONDecodeError as exc:
            p.error(f"--{flag.replace('_', '-')} is not JSON: {exc}")
    args.proposal_guide = None  # the saved Merge guide that --proposal names
    if args.proposal is not None:
        args.proposal_guide = str(Path(args.proposal) / "guides" / "dinado-merge")
        if not Path(args.proposal_guide).is_dir():
            p.error(f"--proposal {args.proposal}: no DiNADO-Merge guide at {args.proposal_guide}")
    if not 0.0 <= args.unfinished_weight < 1.0 or (args.unfinished_weight > 0 and not args.finished_only):
        p.error(f"--unfinished-weight {args.unfinished_weight:g} needs --finished-only and a value in [0, 1)")
    if args.label_power <= 0 or (args.label_power != 1.0 and args.labels != "soft"):
        p.error(f"--label-power {args.label_power:g} needs --labels soft and a positive value")
    args.budgets = sorted(int(x) for x in args.budgets.split(",") if x.strip())
    if any(b < 1 for b in args.budgets):
        p.error(f"--budgets must be positive integers, got {args.budgets}")
    if args.efficiency_temperature is not None and args.efficiency_temperature <= 0:
        p.error(f"--efficiency-temperature must be positive, got {args.efficiency_temperature:g}")
    args.efficiency_alphas = parse_alphas(p, args.efficiency_alphas, args.alpha)
    args.efficiency_variants = [x.strip() for x in args.efficiency_variants.split(",") if x.strip()]
    args.efficiency_arms = [x.strip() for x in args.efficiency_arms.split(",") if x.strip()]
    if not args.efficiency_variants or set(args.efficiency_variants) - set(VARIANTS):
        p.error(f"--efficiency-variants takes some of {', '.join(VARIANTS)}, got {args.efficiency_variants}")
    if not args.efficiency_arms or set(args.efficiency_arms) - {"p", "proposal"}:
        p.error(f"--efficiency-arms takes p and/or proposal, got {args.efficiency_arms}")
    return args


MODULE_VARIANTS = tuple(v for v in VARIANTS if v != "dinado-merge")


def parse_alphas(p: argparse.ArgumentParser, text: str, default: float) -> dict[str, float]:
    """--efficiency-alphas 'nado=1,dinado-soft=4' as {module variant: alpha}; those not named take ``default``."""
    alphas = dict.fromkeys(MODULE_VARIANTS, default)
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            alpha = float(value) if sep else float("nan")
        except ValueError:
            alpha = float("nan")
        if name.strip() not in alphas or not alpha > 0:
            p.error(
                f"--efficiency-alphas: {item!r} is not VARIANT=ALPHA with VARIANT one of "
                f"{', '.join(MODULE_VARIANTS)} and ALPHA a positive number (e.g. 'nado=1,dinado-soft=4')"
            )
        alphas[name.strip()] = alpha
    return alphas


def subset(items: list, n: int, seed: int) -> list:
    """A seeded random subset of n items (all when n is 0 or at least the size), in a fixed order."""
    if n <= 0 or n >= len(items):
        return list(items)
    return random.Random(seed).sample(items, n)


def eval_sets(data_dir: str, split: str, args: dict) -> list:
    """The concept sets a run decodes on ``split`` (dev or test): the run's ``--dev-sets`` / ``--test-sets``
    subset, drawn with its seed (``args`` as ``vars(args)`` or as results.json keeps them)."""
    return subset(load_split(data_dir, split), args[f"{split}_sets"], args["seed"])


def build_base(args, run: Path, train_sets, timer: Timer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.base is None:
        base_dir = run / "base"
        data = run / "base_data"
        data.mkdir(parents=True, exist_ok=True)
        pairs = [(s.concepts, r) for s in train_sets for r in s.references]
        if args.pretrain_examples > 0:
            pairs = pairs[: args.pretrain_examples]
        atomic_write_text(data / "src.txt", "".join(" ".join(c) + "\n" for c, _ in pairs))
        atomic_write_text(data / "trg.txt", "".join(r + "\n" for _, r in pairs))
        config = PretrainConfig(
            data_format="pairs",
            source_file=str(data / "src.txt"),
            target_file=str(data / "trg.txt"),
            n_layer=args.pretrain_layers,
            n_embd=args.pretrain_embd,
            vocab_size=args.pretrain_vocab,
            max_steps=args.pretrain_steps,
            max_epochs=None,
            learning_rate=args.pretrain_lr,
            eval_every=250,
            seed=args.seed,
        )
        with timer.stage("pretrain base"):
            result = pretrain(config, base_dir, overwrite=True, progress=False)
        log(f"base: {result.num_parameters:,} parameters, held-out loss {result.best_val_loss:.3f}")
        source = str(base_dir)
    else:
        source = args.base
    with timer.stage("load base"):
        if args.base is None:
            model = AutoModelForCausalLM.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        else:  # a directory, a hub id or a named offline base (smollm2-135m-instruct)
            model, tokenizer = load_model(source)
        model = model.to(args.device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    chat = has_chat if args.chat == "auto" else args.chat == "true"
    template = args.prompt_template or (INSTRUCTION if chat else "{prompt}")
    args.prompt_format = PromptFormat(template, chat)
    log(f"prompt format: {template!r}, chat template {'on' if chat else 'off'}")
    if args.base is not None and args.base_finetune_steps > 0:
        with timer.stage("fine-tune base on references"):
            prompts = [s.prompt for s in train_sets for _ in s.references]
            targets = [r for s in train_sets for r in s.references]
            model, finetune_info = supervised_finetune(
                model,
                tokenizer,
                prompts,
                targets,
                "lora",
                args.base_finetune_steps,
                batch_size=args.base_finetune_batch_size,
                seed=args.seed,
                prompt_format=args.prompt_format,
            )
        # kept, so that later processes (--base RUN/base) and the instruments (strength.py, calibration.py) read
        # the same fine-tuned base: safetensors weights and the tokenizer
        source = str(run / "base")
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
        model.config._name_or_path = source
        log(f"fine-tuned base saved to {source}")
    else:
        finetune_info = None
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval(), tokenizer, source, finetune_info


def create_guide(args, model, tokenizer, variant: str) -> Guide:
    """A new guide of ``variant`` on ``model`` with the run's options (DiNADO-Merge: LoRA r 8 / alpha 16 and
    ``--merge-options``; the module variants: 2 layers and ``--guide-options``) and ``--guide-seed``."""
    if variant == "dinado-merge":
        options = {"lora_r": 8, "lora_alpha": 16, **args.merge_options}
    else:
        options = {"num_layers": 2, **args.guide_options}
    return Guide.create(model, variant, tokenizer=tokenizer, seed=args.guide_seed, **options)


def no_repeat_ngram(args) -> int:
    """The run's --no-repeat-ngram (0: off); runs recorded before the option existed decoded without it."""
    return getattr(args, "no_repeat_ngram", 0)


def decode_kwargs(args, tokenizer, mode: str) -> dict:
    common = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    no_repeat = no_repeat_ngram(args)
    search = {"no_repeat_ngram_size": no_repeat} if no_repeat > 0 else {}
    if mode == "beam":
        return dict(common, do_sample=False, num_beams=args.beams, early_stopping=True, **search)
    if mode == "greedy":
        return dict(common, do_sample=False, num_beams=1, **search)
    return dict(common, do_sample=True, top_k=0, temperature=1.0)


def decoding_name(args, mode: str) -> str:
    name = {"beam": f"beam {args.beams}", "greedy": "greedy", "sample": "sample"}[mode]
    no_repeat = no_repeat_ngram(args)
    # another decoding than the plain one: its rows must not take the plain rows' place in the results file
    return f"{name} +no-repeat-{no_repeat}" if no_repeat > 0 and mode != "sample" else name


def prompt_ids_and_oracle(args, tokenizer, lines: list[str], oracle):
    """Token ids of each concept-set line in the run's prompt format, and the oracle on token ids (which reads
    the concepts from the line, not from the instruction around it)."""
    ids = encode_prompts(tokenizer, lines, prompt_format=args.prompt_format)
    texts = {tuple(i): line for i, line in zip(ids, lines, strict=True)}
    return ids, as_token_oracle(oracle, tokenizer, texts)


def sample_eos(args, tokenizer) -> int | None:
    return end_of_turn_id(tokenizer) if args.prompt_format.chat else None


def run_systems(
    args, run: Path, model, tokenizer, train_sets, splits, timer: Timer, systems: dict, train_info: dict
):
    """Sample, train the guides and baselines, decode every split both ways: (rows, outputs, samples)."""
    oracle = coverage_oracle()
    soft_oracle = coverage_oracle(soft=True)
    prompts = [s.prompt for s in train_sets]
    prompt_ids, token_oracle = prompt_ids_and_oracle(args, tokenizer, prompts, oracle)
    k = args.samples_per_set
    if args.samples is not None:
        samples = SampleSet.load(args.samples)
        expected = [list(i) for i in prompt_ids for _ in range(k)]
        if samples.prompts != expected:
            raise SystemExit(
                f"--samples {args.samples} holds other prompts than this run's (sets, seed, format)"
            )
        if args.proposal is not None and samples.log_weights is None:
            raise SystemExit(
                f"--samples {args.samples} were drawn from p, not from --proposal {args.proposal}"
            )
        log(f"reusing {args.samples}")
    else:
        proposal = None
        if args.proposal_guide is not None:
            merge_guide = Guide.from_pretrained(args.proposal_guide, model, tokenizer=tokenizer)
            proposal = merge_guide.merge(args.proposal_scale)
            del merge_guide
        with timer.stage("sample from the base" if proposal is None else "sample from the proposal"):
            samples = sample(
                model,
                prompt_ids,
                k,
                token_oracle,
                max_new_tokens=args.max_new_tokens,
                batch_size=max(args.batch_size, 1) * 4,
                seed=args.seed,
                tokenizer=tokenizer,
                eos_token_id=sample_eos(args, tokenizer),
                proposal=proposal,
            )
        del proposal
    samples.save(run / "samples.safetensors")
    guide_oracle_calls = len(samples)
    origin = "p" if samples.log_weights is None else "the proposal"
    log(f"{len(samples)} samples from {origin}, {samples.positive_rate:.1%} cover all their concepts")
    if samples.log_weights is not None:
        ess = mean_group_ess(samples)
        train_info["proposal"] = {"source": args.proposal, "scale": args.proposal_scale, "ess_per_set": ess}
        if args.proposal is not None:  # the proposal's own training samples count too
            proposal_results = json.loads((Path(args.proposal) / "results.json").read_text())
            guide_oracle_calls += int(proposal_results.get("samples", 0))
        log(f"importance weights: mean effective sample size {ess:.2f} of {k} per concept set")
    training_set, label_token_oracle = samples, token_oracle
    label_oracle = training_label_oracle(args)
    if label_oracle is not None:
        # the same samples labelled by the covered share and/or with word lists / unfinished ones at 0; no oracle
        # call is counted twice (all are read off the same completion); samples.safetensors keeps the
        # all-concepts labels
        _, label_token_oracle = prompt_ids_and_oracle(args, tokenizer, prompts, label_oracle)
        training_set = relabel(samples, label_token_oracle)
        kind = "soft coverage" if args.labels == "soft" else "all-concepts"
        unfinished = (
            f"unfinished x {args.unfinished_weight:g}" if args.unfinished_weight else "unfinished at 0"
        )
        changes = [
            what
            for what, on in (("word lists at 0", args.sentences_only), (unfinished, args.finished_only))
            if on
        ]
        changed = f" ({' and '.join(changes)})" if changes else ""
        log(f"{kind} labels{changed}: mean label {training_set.positive_rate:.3f}")
    if args.references > 0:
        pairs = [(s.prompt, r) for s in train_sets for r in s.references[: args.references]]
        references = reference_samples(
            tokenizer,
            [p for p, _ in pairs],
            [r for _, r in pairs],
            label_token_oracle,
            prompt_format=args.prompt_format,
        )
        training_set = SampleSet.concat([training_set, references])
        guide_oracle_calls += len(references)
        train_info["references"] = {"samples": len(references), "mean_label": references.positive_rate}
        log(
            f"+ {len(references)} references of the training concept sets as unweighted samples (mean label "
            f"{references.positive_rate:.3f}): R is biased towards them"
        )
    # soft labels only (parse_args checks): the share, references' too, to the power k
    if args.label_power != 1.0:
        training_set = training_set.with_labels(training_set.labels**args.label_power)
        log(f"labels to the power {args.label_power:g}: mean label {training_set.positive_rate:.3f}")
    train_info["labels"] = {
        "kind": args.labels,
        "sentences_only": args.sentences_only,
        "finished_only": args.finished_only,
        "unfinished_weight": args.unfinished_weight,
        "mean": training_set.positive_rate,
    }

    def fit(guide: Guide, data, steps: int) -> dict:
        return train(
            guide,
            data,
            max_steps=steps,
            batch_size=args.train_batch_size,
            seed=args.seed,
            learning_rate=args.guide_lr,
            adam_epsilon=args.guide_adam_epsilon,
        ).to_dict()

    for variant in [v for v in VARIANTS if v in args.systems]:
        if args.reuse_guides is not None:  # decode guides an earlier run trained (its samples, its recipe)
            source = Path(args.reuse_guides) / "guides" / variant
            guide = Guide.from_pretrained(source, model, tokenizer=tokenizer)
            train_info[variant] = {"reused": str(source)}
        else:
            guide = create_guide(args, model, tokenizer, variant)
            with timer.stage(f"train {variant}"):
                report = fit(guide, training_set, args.guide_steps)
            train_info[variant] = {
                "final_loss": report["loss"][-1],
                "steps": report["steps"],
                "loss": report["loss"],
                "cross_entropy": report["cross_entropy"],
                "regularizer": report["regularizer"],
                "seconds": timer.seconds[f"train {variant}"],
            }
        guide.save_pretrained(run / "guides" / variant)
        systems[variant] = guide.merge(args.merge_scale) if variant == "dinado-merge" else guide

    for name, method in (("sft-lora", "lora"), ("prompt-tuning", "prompt")):
        if name not in args.systems:
            continue
        systems[name], train_info[name] = fine_tune_on_references(
            args, model, tokenizer, train_sets, method, name, timer
        )

    rows: list[dict] = []
    outputs: dict[str, dict[str, list[str]]] = {}
    candidate_kwargs = (
        {} if args.candidates is None else {"candidates": args.candidates}
    )  # module guides only
    for split, sets in splits.items():
        split_prompts = [s.prompt for s in sets]
        for mode in args.decodings:
            for name, source in systems.items():
                torch.manual_seed(args.seed)
                key = f"decode {split} {mode} {name}"
                with timer.stage(key):
                    texts, _, _ = generate_texts(
                        source,
                        tokenizer,
                        split_prompts,
                        args.batch_size,
                        alpha=args.alpha if isinstance(source, Guide) else 1.0,
                        prompt_format=args.prompt_format,
                        **(candidate_kwargs if isinstance(source, Guide) else {}),
                        **decode_kwargs(args, tokenizer, mode),
                    )
                calls = guide_oracle_calls if name in VARIANTS else 0
                rows.append(
                    {
                        "split": split,
                        "decoding": decoding_name(args, mode),
                        "system": name,
                        "train_oracle_calls": calls,
                        "test_oracle_calls": 0,
                        "decode_seconds": timer.seconds[key],
                        "outputs_key": f"{split}/{mode}/{name}",
                        **score(args, model, tokenizer, sets, texts),
                    }
                )
                outputs[f"{split}/{mode}/{name}"] = texts
            if mode == "sample":
                for n in args.best_of:
                    key = f"decode {split} best-of-{n}"
                    with timer.stage(key):
                        texts, info = best_of_n(
                            model,
                            tokenizer,
                            split_prompts,
                            n,
                            soft_oracle,
                            args.max_new_tokens,
                            batch_size=args.batch_size,
                            seed=args.seed,
                            prompt_format=args.prompt_format,
                        )
                    rows.append(
                        {
                            "split": split,
                            "decoding": f"best of {n} samples",
                            "system": "base",
                            "train_oracle_calls": 0,
                            "test_oracle_calls": info["oracle_calls"],
                            "decode_seconds": timer.seconds[key],
                            "outputs_key": f"{split}/best-of-{n}/base",
                            **score(args, model, tokenizer, sets, texts),
                        }
                    )
                    outputs[f"{split}/best-of-{n}/base"] = texts
        print(main_table(rows, split), flush=True)

    return rows, outputs, samples


def open_run(run: Path, device: str = "cpu"):
    """An earlier run's ``results.json``, its base (frozen, eval mode, with a pad token, on ``device``) and its
    prompt format: (results, model, tokenizer, prompt_format), for the instruments that read a run's guides."""
    results = json.loads((Path(run) / "results.json").read_text())
    model, tokenizer = load_model(results["base"])
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return results, model, tokenizer, PromptFormat(**results["args"]["prompt_format"])


def training_label_oracle(args):
    """The oracle whose values the guides train on, or None when it is the samples' own all-concepts oracle: the
    covered share (``--labels soft``), with word lists (``--sentences-only``) and completions cut off
    mid-sentence (``--finished-only``) at 0, or times ``--unfinished-weight``."""
    if args.labels == "soft" or args.sentences_only or args.finished_only:
        return coverage_oracle(
            soft=args.labels == "soft",
            sentences_only=args.sentences_only,
            finished_only=args.finished_only,
            unfinished_weight=args.unfinished_weight,
        )
    return None


def score(args, model, tokenizer, sets, texts: list[str]) -> dict:
    """Coverage, success and the caption metrics of one output per concept set, and the base perplexity of the
    outputs (the frozen base reading each output after its prompt, as the run formats it)."""
    return {
        **commongen_metrics(sets, texts),
        "base_ppl": base_perplexity(
            model, tokenizer, [s.prompt for s in sets], texts, args.batch_size, args.prompt_format
        ),
    }


def fine_tune_on_references(args, model, tokenizer, train_sets, method: str, name: str, timer: Timer):
    """A supervised baseline on the references of the training concept sets: (model, info). LoRA adapts the
    modules DiNADO-Merge adapts (``--merge-options``' ``lora_target_modules``, else every linear layer), so the
    two have the same adapter."""
    prompts = [s.prompt for s in train_sets for _ in s.references]
    targets = [r for s in train_sets for r in s.references]
    lora = {}
    if method == "lora":
        lora = {
            key: args.merge_options[key]
            for key in ("lora_target_modules", "lora_r", "lora_alpha")
            if key in args.merge_options
        }
    with timer.stage(f"train {name}"):
        tuned, info = supervised_finetune(
            model,
            tokenizer,
            prompts,
            targets,
            method,
            args.sft_steps,
            batch_size=args.train_batch_size,
            seed=args.seed,
            prompt_format=args.prompt_format,
            **lora,
        )
    return tuned.eval(), info


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = Path(args.output)
    run.mkdir(parents=True, exist_ok=True)
    timer = Timer(log)
    total_start = time.perf_counter()

    with timer.stage("load data"):
        all_train = load_split(args.data_dir, "train")
        splits = {name: eval_sets(args.data_dir, name, vars(args)) for name in args.splits}
    model, tokenizer, base_source, finetune_info = build_base(args, run, all_train, timer)
    train_sets = subset(all_train, args.train_sets, args.seed + 1)
    systems: dict[str, object] = {} if args.no_base else {"base": model}
    train_info: dict[str, dict] = {}
    rows, outputs, samples = [], {}, None
    if not args.efficiency_only:
        rows, outputs, samples = run_systems(
            args, run, model, tokenizer, train_sets, splits, timer, systems, train_info
        )

    efficiency = None
    if not args.no_efficiency and args.budgets:
        # the proposal: p at --efficiency-temperature, else the supervised LoRA model (trained here if need be)
        proposal = None
        if args.efficiency_temperature is None and "proposal" in args.efficiency_arms:
            proposal = systems.get("sft-lora")
            if proposal is None:
                proposal, train_info["sft-lora"] = fine_tune_on_references(
                    args, model, tokenizer, train_sets, "lora", "sft-lora", timer
                )
        efficiency = run_efficiency(args, model, tokenizer, proposal, all_train, splits, timer)

    results = {
        "command": shlex.join(  # quoted: copy-pasteable, empty arguments kept
            ["python", "benchmarks/commongen/run.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "args": {k: (v.to_dict() if isinstance(v, PromptFormat) else v) for k, v in vars(args).items()},
        "base": base_source,
        "base_parameters": sum(p.numel() for p in model.parameters()),
        "base_finetune": finetune_info,  # --base-finetune-steps: supervised_finetune's info, else None
        "train_sets": len(train_sets),
        "samples": len(samples) if samples is not None else 0,
        "samples_positive_rate": samples.positive_rate if samples is not None else None,
        "split_sizes": {k_: len(v) for k_, v in splits.items()},
        "train": train_info,
        "rows": rows,
        "efficiency": efficiency,
        "seconds": timer.seconds,
        "total_seconds": time.perf_counter() - total_start,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(args.device)}" if str(args.device).startswith("cuda") else ""),
    }
    atomic_write_text(run / "results.json", json.dumps(results, indent=2))
    atomic_write_text(run / "outputs.json", json.dumps(outputs, indent=1))
    if any("cross_entropy" in info for info in train_info.values()):
        plot_training_curves(train_info, run / "training_curves.png")
    if args.rows_json:
        atomic_write_text(args.rows_json, json.dumps(machine_rows(rows, results["args"]), indent=1) + "\n")
    markdown = results_markdown(results)
    atomic_write_text(run / "results.md", markdown)
    print(markdown)
    log(f"total {results['total_seconds']:.0f} s; results in {run}")
    return results


def run_efficiency(args, model, tokenizer, proposal_model, all_train, splits, timer: Timer) -> dict:
    """Dev success vs labelled samples per concept set, for NADO and DiNADO-Soft, from p and from a proposal:
    ``proposal_model`` (the supervised LoRA model), or p at ``--efficiency-temperature`` when that is given.

    Every budget's samples are the first ones of each concept set's pool of ``max(--budgets)``. Samples drawn
    from the base itself (p, or p tempered) keep the base's hidden states from the passes that drew them
    (``sample_with_features``), and each cell trains on its budget's part of that cache (``FeatureCache.subset``):
    the base runs once per pool, not once per cell."""
    sets = subset(all_train, args.efficiency_sets, args.seed + 2)
    dev = splits["dev"][: args.efficiency_dev_sets] if args.efficiency_dev_sets > 0 else splits["dev"]
    dev_prompts = [s.prompt for s in dev]
    lines = [s.prompt for s in sets]
    prompt_ids, token_oracle = prompt_ids_and_oracle(args, tokenizer, lines, coverage_oracle())
    # the guides train on run_systems' labels (--labels, --sentences-only, --finished-only)
    label_token_oracle = None
    label_oracle = training_label_oracle(args)
    if label_oracle is not None:
        _, label_token_oracle = prompt_ids_and_oracle(args, tokenizer, lines, label_oracle)
    most = max(args.budgets)
    common = dict(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size * 4,
        tokenizer=tokenizer,
        eos_token_id=sample_eos(args, tokenizer),
    )

    def draw(seed: int, **kwargs) -> tuple[SampleSet, dict | None]:
        """(samples, {variant: FeatureCache} or None) drawn from the base or, with proposal=, from that."""
        if kwargs.get("proposal") is not None:
            return sample(model, prompt_ids, most, token_oracle, seed=seed, **common, **kwargs), None
        pool, caches = sample_with_features(
            model,
            [create_guide(args, model, tokenizer, v) for v in args.efficiency_variants],
            prompt_ids,
            most,
            token_oracle,
            seed=seed,
            **common,
            **kwargs,
        )
        return pool, dict(zip(args.efficiency_variants, caches, strict=True))

    temperature = args.efficiency_temperature
    if temperature is None:
        proposal_name = "sft-lora (supervised LoRA fine-tune on references)"
        proposal_kwargs = {"proposal": proposal_model}
    else:
        proposal_name = f"p at temperature {temperature:g}"
        proposal_kwargs = {"temperature": temperature}
    pools = {}
    if "p" in args.efficiency_arms:
        with timer.stage("efficiency: sample from p"):
            pools["p"] = draw(args.seed + 3)
    if "proposal" in args.efficiency_arms:
        with timer.stage("efficiency: sample from the proposal"):
            pools["proposal+IS"] = draw(args.seed + 4, **proposal_kwargs)
    cells = []
    for arm, (pool, caches) in pools.items():
        labelled = pool if label_token_oracle is None else relabel(pool, label_token_oracle)
        log(f"efficiency, {arm}: {len(pool)} samples, {pool.positive_rate:.1%} cover all their concepts")
        for budget in args.budgets:
            indices = [i * most + j for i in range(len(sets)) for j in range(budget)]
            data = pool.subset(indices)
            ess = mean_group_ess(data)
            for variant in args.efficiency_variants:
                guide = create_guide(args, model, tokenizer, variant)
                merge = variant == "dinado-merge"
                strength = args.merge_scale if merge else args.efficiency_alphas[variant]
                key = f"efficiency: {variant} {arm} {budget}"
                with timer.stage(key):
                    train(
                        guide,
                        labelled.subset(indices),
                        max_steps=args.efficiency_steps,
                        batch_size=args.train_batch_size,
                        seed=args.seed,
                        learning_rate=args.guide_lr,
                        adam_epsilon=args.guide_adam_epsilon,
                        cache_features=None if caches is None else caches[variant].subset(pool, indices),
                    )
                    torch.manual_seed(args.seed)
                    texts, _, _ = generate_texts(
                        guide.merge(strength) if merge else guide,
                        tokenizer,
                        dev_prompts,
                        args.batch_size,
                        alpha=1.0 if merge else strength,
                        prompt_format=args.prompt_format,
                        **decode_kwargs(args, tokenizer, "sample"),
                    )
                metrics = commongen_metrics(dev, texts)
                cells.append(
                    {
                        "variant": variant,
                        "samples": arm,
                        "per_set": budget,
                        "strength": strength,
                        "oracle_calls": len(data),
                        "positive_rate": data.positive_rate,
                        "ess_per_set": ess,
                        "dev_success": metrics["success"],
                        "dev_sentence_success": metrics["sentence_success"],
                        "dev_coverage": metrics["coverage"],
                        "seconds": timer.seconds[key],
                    }
                )
                log(f"{key}: dev success {metrics['success']:.3f} (ESS {ess:.2f} per set)")
    torch.manual_seed(args.seed)
    texts, _, _ = generate_texts(
        model,
        tokenizer,
        dev_prompts,
        args.batch_size,
        prompt_format=args.prompt_format,
        **decode_kwargs(args, tokenizer, "sample"),
    )
    base = commongen_metrics(dev, texts)
    result = {
        "train_sets": len(sets),
        "dev_sets": len(dev),
        "steps": args.efficiency_steps,
        "labels": args.labels,
        "proposal": proposal_name,
        "base_dev_success": base["success"],
        "base_dev_sentence_success": base["sentence_success"],
        "base_dev_coverage": base["coverage"],
        "cells": cells,
    }
    plot_efficiency(result, Path(args.output) / "efficiency.png")
    return result


def plot_training_curves(train_info: dict, path: Path) -> None:
    """Cross-entropy and regulariser per training step of every guide, in one PNG (method.md: DiNADO is claimed
    to keep the regulariser small where NADO's can grow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ce, ax_reg) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, info) in enumerate(train_info.items()):
        if "cross_entropy" not in info:
            continue
        color = f"C{i}"  # one colour per guide in both panels
        ax_ce.plot(info["cross_entropy"], label=name, color=color)
        if any(v != 0 for v in info["regularizer"]):
            ax_reg.plot(info["regularizer"], label=name, color=color)
    ax_ce.set_title("cross-entropy term")
    ax_reg.set_title("regulariser term (KL(Bern(S) || Bern(R)))")
    for ax in (ax_ce, ax_reg):
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def plot_efficiency(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in dict.fromkeys(c["variant"] for c in result["cells"]):
        for arm, style in (("p", "-o"), ("proposal+IS", "--s")):
            cells = [c for c in result["cells"] if c["variant"] == variant and c["samples"] == arm]
            if not cells:  # an arm the run did not sample (--efficiency-arms)
                continue
            ax.plot(
                [c["per_set"] for c in cells],
                [c["dev_success"] for c in cells],
                style,
                label=f"{variant}, {arm}",
            )
    ax.axhline(result["base_dev_success"], color="grey", lw=1, label="base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labelled samples per concept set")
    ax.set_ylabel("all-concepts success (dev, sampling)")
    ax.set_title(f"CommonGen sample efficiency ({result['train_sets']} concept sets)")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def machine_rows(rows: list[dict], args: dict) -> list[dict]:
    """The rows in the format of docs/results/commongen_smollm2.json (system / decoding names fixed there), with
    each guide's ``strength`` (the run's ``--merge-scale`` for DiNADO-Merge, ``--alpha`` for the module variants;
    None for the rest), a module variant's ``candidates`` when it was decoded with candidate-restricted guidance,
    and ``word_lists`` / ``loops`` / ``sentence_success`` / ``unfinished`` where the run scored them. ``args`` is
    the run's arguments as results.json keeps them."""
    out = []
    for r in rows:
        system, decoding = r["system"], r["decoding"]
        if decoding.startswith("best of "):
            system, decoding = f"best-of-{decoding.split()[2]}", "sample"
        strength, candidates = None, None
        if system in VARIANTS:
            strength = args["merge_scale"] if system == "dinado-merge" else args["alpha"]
            candidates = None if system == "dinado-merge" else args.get("candidates")
        extra = {"candidates": candidates} if candidates is not None else {}
        extra.update({k: r[k] for k in ("word_lists", "loops", "sentence_success", "unfinished") if k in r})
        out.append(
            {
                "split": r["split"],
                "decoding": decoding.replace(" ", ""),
                "system": system,
                "success": r["success"],
                "coverage": r["coverage"],
                "bleu4": r["bleu4"],
                "cider": r["cider"],
                "meteor": r["meteor"],
                "rougeL": r["rouge_l"],
                "words": r["mean_words"],
                "base_ppl": r.get("base_ppl"),
                "strength": strength,
                "oracle_calls_train": r["train_oracle_calls"],
                "oracle_calls_test": r["test_oracle_calls"],
                **extra,
            }
        )
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def main_table(rows: list[dict], split: str | None = None) -> str:
    head = (
        "| split | decoding | system | success | coverage | BLEU-4 | CIDEr | METEOR | ROUGE-L | SPICE | words | "
        "base ppl | oracle calls (train / test) | decode s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if split is not None and r["split"] != split:
            continue
        lines.append(
            f"| {r['split']} | {r['decoding']} | {r['system']} | {_fmt(r['success'])} | {_fmt(r['coverage'])} | "
            f"{_fmt(r['bleu4'])} | {_fmt(r['cider'])} | {_fmt(r['meteor'])} | {_fmt(r['rouge_l'])} | "
            f"{_fmt(r['spice'])} | {_fmt(r['mean_words'], 1)} | {_fmt(r.get('base_ppl'), 1)} | "
            f"{r['train_oracle_calls']:,} / "
            f"{r['test_oracle_calls']:,} | {_fmt(r['decode_seconds'], 1)} |"
        )
    return head + "\n".join(lines) + "\n"


def results_markdown(results: dict) -> str:
    out = [
        f"Command: `{results['command']}`",
        "",
        f"Base: `{results['base']}` ({results['base_parameters']:,} parameters).",
    ]
    if results["rows"]:
        out[-1] += (
            f" Guides trained on {results['samples']:,} samples from the base ({results['train_sets']:,} train "
            f"concept sets x {results['args']['samples_per_set']}; {results['samples_positive_rate']:.1%} cover "
            "all concepts). Evaluated concept sets: "
            + ", ".join(f"{k} {v:,}" for k, v in results["split_sizes"].items())
            + ". SPICE is unavailable offline (n/a)."
        )
        out += ["", main_table(results["rows"])]
    else:
        out.append("")
    eff = results.get("efficiency")
    if eff:
        out += [
            f"Sample efficiency: {eff['train_sets']:,} train concept sets, {eff['steps']} training steps per cell, "
            f"all-concepts success on {eff['dev_sets']:,} dev concept sets with sampling (base: "
            f"{eff['base_dev_success']:.3f}). Proposal: {eff['proposal']}; ESS = mean effective sample size "
            "per concept set; positive rate = share of the samples that cover every concept; strength = alpha "
            "(module variants) or adapter scale (DiNADO-Merge).",
            "",
            "| variant | samples | per set | strength | oracle calls | positive rate | ESS per set | dev success | "
            "sentence success | coverage | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in eff["cells"]:
            out.append(
                f"| {c['variant']} | {c['samples']} | {c['per_set']} | {_fmt(c.get('strength'), 2)} | "
                f"{c['oracle_calls']:,} | {c['positive_rate']:.3f} | {c['ess_per_set']:.2f} | "
                f"{c['dev_success']:.3f} | {_fmt(c.get('dev_sentence_success'))} | "
                f"{_fmt(c.get('dev_coverage'))} | {c['seconds']:.0f} |"
            )
        out.append("")
    out += ["| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in results["seconds"].items()]
    out += ["", f"Total: {results['total_seconds']:.0f} s on {results['machine']}.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
