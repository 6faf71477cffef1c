"""Side investigation: DiNADO-Merge at other learning rates, on the samples and base of a finished run.

    python benchmarks/formality/merge_lr.py --run runs/formality-de 1e-3:300 5e-3:300

Each ``LR:STEPS`` trains a Merge guide toward formal (seeded as in run.py, so 1e-3:300 reproduces the run's
own Merge row), decodes the test sources greedily and prints one JSON line with the run's metrics.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from dinado import Guide, SampleSet, train
from dinado.oracles import ClassifierOracle
from dinado.tasks.formality import load_cocoa
from dinado.text import generate_texts

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="output directory of a finished run.py (with base/)")
    p.add_argument("settings", nargs="+", help="LR:STEPS, e.g. 1e-3:300")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("formality_run", HERE / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = Path(args.run)
    saved = json.loads((run / "results.json").read_text())["args"]
    model = AutoModelForSeq2SeqLM.from_pretrained(run / "base").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "base")
    samples = SampleSet.load(run / "samples.safetensors")
    judge = ClassifierOracle.from_pretrained(str(run / "classifier"), "formal", threshold=0.5, batch_size=64)
    test = load_cocoa(saved["cocoa_root"], saved["pair"], "test")
    sources = [e.source for e in test]
    for setting in args.settings:
        lr, steps = float(setting.split(":")[0]), int(setting.split(":")[1])
        torch.manual_seed(saved["seed"])
        guide = Guide.create(
            copy.deepcopy(model), "dinado-merge", tokenizer=tokenizer, num_layers=2, lora_r=8, lora_alpha=16
        )
        start = time.perf_counter()
        report = train(
            guide,
            samples,
            max_steps=steps,
            batch_size=saved["train_batch_size"],
            seed=saved["seed"],
            learning_rate=lr,
        )
        texts, _, _ = generate_texts(
            guide.merge(), tokenizer, sources, saved["batch_size"], max_new_tokens=saved["max_new_tokens"],
            do_sample=False, num_beams=saved["beams"], pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        row = bench.score(texts, sources, test, judge, saved["lang"])
        print(
            json.dumps(
                {
                    "lr": lr,
                    "steps": steps,
                    "final_loss": report.loss[-1],
                    "seconds": time.perf_counter() - start,
                    **row,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
