"""A whole training step of a small BERT with LAMB against AdamW (CPU): what the optimizer costs in it.

The model is transformers' ``BertForSequenceClassification`` built from a config (no download;
hidden 256, 4 layers, 4 heads, vocabulary 30522: 11M parameters, most of them the word
embedding), or, without transformers, a ``torch.nn.TransformerEncoder`` of the same widths
with an embedding of the same size. Parameters are grouped as transformers' ``Trainer`` groups
them (weight decay 0.01, none for biases and LayerNorm). Each timed step is forward, backward
and the optimizer step, batch 8 of 64 tokens; every optimizer trains its own copy of the model,
interleaved round by round; medians, and ratios to the faster AdamW taken round by round.

    python bench/bench_lamb_train_step.py          # bench/results/lamb_train_step_cpu.md and .json (about 1 min)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

import torchlars
from torchlars import LAMB

BENCH_DIR = pathlib.Path(__file__).resolve().parent
HIDDEN, LAYERS, HEADS, VOCAB, SEQUENCE, BATCH = 256, 4, 4, 30522, 64, 8


class _Encoder(nn.Module):
    """The stand-in without transformers: embeddings, a post-LayerNorm encoder, a classifier."""

    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(512, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, 4 * HIDDEN, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.classifier = nn.Linear(HIDDEN, 2)

    def forward(self, input_ids, labels):
        positions = torch.arange(input_ids.shape[1])
        hidden = self.encoder(self.LayerNorm(self.embeddings(input_ids) + self.position_embeddings(positions)))
        return nn.functional.cross_entropy(self.classifier(hidden[:, 0]), labels)


def make_model() -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    try:
        import transformers
    except ImportError:
        return _Encoder(), "torch.nn.TransformerEncoder (transformers is not installed)"
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=4 * HIDDEN, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    return model, f"transformers {transformers.__version__} BertForSequenceClassification"


def loss_of(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(model, _Encoder):
        return model(input_ids, labels)
    return model(input_ids=input_ids, labels=labels).loss


def trainer_groups(model: nn.Module, weight_decay: float = 0.01) -> list[dict]:
    """Trainer's grouping: no decay for biases and LayerNorm weights."""
    no_decay = {name for name, _ in model.named_parameters() if name.endswith("bias") or "LayerNorm" in name
                or ".norm" in name}
    return [
        {"params": [p for n, p in model.named_parameters() if n not in no_decay], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
    ]


def optimizers_for(model: nn.Module) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    variants = {
        "AdamW(foreach=True)": lambda params: torch.optim.AdamW(params, lr=1e-4, eps=1e-6, foreach=True),
        "AdamW(fused=True)": lambda params: torch.optim.AdamW(params, lr=1e-4, eps=1e-6, fused=True),
        "LAMB(foreach=True)": lambda params: LAMB(params, lr=1e-3, foreach=True),
    }
    if LAMB([nn.Parameter(torch.zeros(1))])._step_supports_amp_scaling:
        variants["LAMB(fused=True)"] = lambda params: LAMB(params, lr=1e-3, fused=True)
    made = {}
    for name, make in variants.items():
        copy_of_model = copy.deepcopy(model)
        made[name] = (copy_of_model, make(trainer_groups(copy_of_model)))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=pathlib.Path, default=BENCH_DIR / "results" / "lamb_train_step_cpu.md")
    args = parser.parse_args()
    model, model_name = make_model()
    model.train()
    variants = optimizers_for(model)
    generator = torch.Generator().manual_seed(0)
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants.items())
        for round_index in range(args.rounds + 2):  # the first two warm up
            input_ids = torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=generator)
            labels = torch.randint(0, 2, (BATCH,), generator=generator)
            order = order[1:] + order[:1]
            for name, (variant_model, optimizer) in order:
                start = time.perf_counter()
                optimizer.zero_grad()
                loss_of(variant_model, input_ids, labels).backward()
                optimizer.step()
                if round_index >= 2:
                    times[name].append(time.perf_counter() - start)
        fastest = [min(a, b) for a, b in zip(times["AdamW(foreach=True)"], times["AdamW(fused=True)"])]
        results[str(threads)] = {}
        for name, values in times.items():
            ratios = [value / base for value, base in zip(values, fastest)]
            quartiles = statistics.quantiles(ratios, n=4)
            results[str(threads)][name] = {"ms": statistics.median(values) * 1e3, "ratio": statistics.median(ratios),
                                           "iqr": [quartiles[0], quartiles[2]]}
    parameters = sum(p.numel() for p in model.parameters())
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# A training step of a small BERT: LAMB against AdamW (CPU)", "",
        f"`python {' '.join(sys.argv)}`", "",
        f"{now}; torch {torch.__version__}, torchlars {torchlars.__version__}; {model_name}, hidden {HIDDEN}, "
        f"{LAYERS} layers, vocabulary {VOCAB} ({parameters:,} parameters), batch {BATCH} x {SEQUENCE} tokens, "
        "Trainer's decay / no-decay groups.", "",
        f"Forward, backward and step; medians of {args.rounds} interleaved rounds, the ratio to the faster AdamW "
        "taken round by round [IQR].", "",
        "| optimizer | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in args.threads) + " |",
        "|---|" + "---:|" * len(args.threads),
    ]
    for name in variants:
        cells = [f"{results[str(t)][name]['ms']:.0f} ms, {results[str(t)][name]['ratio']:.2f}x "
                 f"[{results[str(t)][name]['iqr'][0]:.2f}–{results[str(t)][name]['iqr'][1]:.2f}]" for t in args.threads]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("")
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": f"python {' '.join(sys.argv)}", "date": now, "torch": torch.__version__, "model": model_name,
         "parameters": parameters, "results": results}, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
