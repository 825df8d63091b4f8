# %% [markdown]
# # KL-regularised fine-tuning: how much does a penalty to the base model limit drift?
#
# Fine-tunes the packaged SmolLM2-135M-Instruct for a few dozen steps to answer like a pirate
# (`data/finetune/pirate.jsonl`), once per penalty weight. The loss is the usual next-token
# cross-entropy on the answers plus `weight * KL(P_model || P_base)` on the same positions
# (`divscope.losses.KLRegularizer`, the frozen base model as reference). After every few steps
# it measures **drift**: on held-out questions the base model's own greedy answers are
# teacher-forced under the base and the tuned model (the persona pipeline's scorer), and the
# full-vocabulary KL(P_base || P_tuned) is averaged over positions. Whatever picture comes
# out is the run's, not an assumption.
#
# Run it with `python examples/kl_regularized_finetune.py` from the repository root (about 5
# minutes on 2 CPU cores) or cell by cell in VS Code. Parameters can also be given on the
# command line as NAME=VALUE (Python literals), e.g. the LoRA adapter shipped in
# `data/adapters/smollm2-pirate-lora/` (its README has the exact command): `LORA_RANK=8`
# trains a LoRA adapter (peft) instead of the last blocks, `ADAPTER_DIR=...` saves it.

# %% Parameters
MODEL = "smollm2-135m-instruct"  # hub name, local path or packaged short name
DATA_FILE = "data/finetune/pirate.jsonl"  # {"question", "answer"} per line
HELDOUT_FILE = "data/questions/eval20.yaml"  # held-out questions for drift
N_HELDOUT = 6  # held-out questions used for drift
PENALTY_WEIGHTS = [0.0, 0.1, 1.0]  # one fine-tuning run per weight
STEPS = 30  # optimizer steps per run
BATCH_SIZE = 8  # question/answer pairs per step
LEARNING_RATE = 1e-4  # AdamW
TRAIN_LAST_BLOCKS = 6  # train only the last k transformer blocks (CPU budget; LORA_RANK = 0)
LORA_RANK = 0  # > 0: train a LoRA adapter of this rank on q_proj/v_proj of every block instead
ADAPTER_DIR = None  # with LORA_RANK: save the last penalty weight's adapter here (safetensors)
DIRECTION = "reverse"  # penalty KL(P_model || P_base) ("forward": KL(P_base || P_model))
EVAL_EVERY = 5  # steps between drift measurements
MAX_NEW_TOKENS = 24  # length of the base model's held-out answers
SEED = 0  # data order and initialisation
OUTPUT_DIR = "eval_results"  # results: OUTPUT_DIR/<run>/finetune_log.json
FIGURES_DIR = "figures"  # figures: FIGURES_DIR/<run>/*.png

# %% Imports
import ast
import copy
import json
import random
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

from divscope.divergence.fused import kl
from divscope.losses import KLRegularizer
from divscope.models.generate import generate_hf, stop_ids
from divscope.models.load import load_model
from divscope.models.teacher_force import output_head, response_logprobs
from divscope.personas.data import load_questions
from divscope.runmeta import atomic_write_json, new_run_dir, run_metadata

for arg in sys.argv[1:]:  # NAME=VALUE overrides of the parameter cell (kernel arguments pass)
    name, eq, value = arg.partition("=")
    if eq and name.isupper() and name in globals():
        try:
            globals()[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # not a literal: a plain string (a path)
            globals()[name] = value

torch.manual_seed(SEED)
run_dir = new_run_dir(Path(OUTPUT_DIR), "kl_finetune")
fig_dir = Path(FIGURES_DIR) / run_dir.name
fig_dir.mkdir(parents=True, exist_ok=True)

# %% The base model, the training pairs and the held-out answers of the base model
base, tok = load_model(MODEL)
base.requires_grad_(False)
pairs = [json.loads(line) for line in Path(DATA_FILE).read_text().splitlines() if line.strip()]


def chat_ids(question: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=False)["input_ids"]


end = (
    tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
)
examples = [
    (chat_ids(p["question"]), tok(p["answer"], add_special_tokens=False)["input_ids"] + [end])
    for p in pairs
]
heldout = [chat_ids(q.text) for q in load_questions(HELDOUT_FILE, N_HELDOUT)]
base_answers = generate_hf(base, tok, heldout, max_new_tokens=MAX_NEW_TOKENS)
base_head = output_head(base)
base_lp = [
    response_logprobs(base, p, a, base_head) for p, a in zip(heldout, base_answers, strict=True)
]
print(
    f"{len(examples)} training pairs, {len(heldout)} held-out questions; "
    f"base answer to the first: {tok.decode(base_answers[0])!r}"
)
stops = stop_ids(tok, base)


def batch_tensors(batch: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of the answer positions' predictions."""
    seqs = [p + a for p, a in batch]
    length = max(map(len, seqs))
    ids = torch.zeros((len(seqs), length), dtype=torch.long)
    attn = torch.zeros_like(ids)
    answer = torch.zeros((len(seqs), length - 1), dtype=torch.bool)
    for i, ((p, _), s) in enumerate(zip(batch, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        answer[i, len(p) - 1 : len(s) - 1] = True  # positions that predict answer tokens
    return {"input_ids": ids, "attention_mask": attn, "answer_mask": answer}


def drift(model: torch.nn.Module) -> float:
    """Mean over held-out positions of KL(P_base || P_tuned), teacher-forced, nats."""
    head = output_head(model)
    total, n = 0.0, 0
    for p, a, lb in zip(heldout, base_answers, base_lp, strict=True):
        lt = response_logprobs(model, p, a, head)
        total += kl(lb, lt).sum().item()
        n += len(a)
    return total / n


# %% Fine-tune once per penalty weight
log: dict[str, dict[str, list]] = {}
t0 = time.perf_counter()
for weight in PENALTY_WEIGHTS:
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    if LORA_RANK:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["q_proj", "v_proj"]
        )
        model = get_peft_model(model, lora)
    else:
        for block in model.model.layers[-TRAIN_LAST_BLOCKS:]:
            block.requires_grad_(True)
        model.model.norm.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)

    def base_logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, :-1
        ]

    reg = KLRegularizer(weight, direction=DIRECTION, ref=base_logits)
    entry: dict[str, list] = {
        "step": [],
        "task_loss": [],
        "penalty": [],
        "drift_step": [],
        "drift": [drift(model)],
    }
    entry["drift_step"].append(0)
    for step in range(1, STEPS + 1):
        batch = batch_tensors(rng.sample(examples, BATCH_SIZE))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, :-1
        ]
        targets = batch["input_ids"][:, 1:]
        mask = batch["answer_mask"]
        task = torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask])
        penalty, metrics = (
            reg(logits, batch, mask=mask)
            if weight > 0
            else (torch.zeros(()), {"mean": float("nan")})
        )
        opt.zero_grad()
        (task + penalty).backward()
        opt.step()
        entry["step"].append(step)
        entry["task_loss"].append(task.item())
        entry["penalty"].append(metrics["mean"])
        if step % EVAL_EVERY == 0 or step == STEPS:
            model.eval()
            entry["drift_step"].append(step)
            entry["drift"].append(drift(model))
            model.train()
            print(
                f"weight {weight}: step {step:3d}  task loss {task.item():.3f}  "
                f"drift {entry['drift'][-1]:.4f} nats"
            )
    model.eval()
    with torch.no_grad():
        sample = generate_hf(model, tok, heldout[:1], max_new_tokens=MAX_NEW_TOKENS)[0]
    entry["sample_answer"] = tok.decode([t for t in sample if t not in stops])
    log[str(weight)] = entry
    if LORA_RANK and ADAPTER_DIR:
        model.save_pretrained(ADAPTER_DIR)  # adapter_config.json + adapter_model.safetensors
        print(f"saved the LoRA adapter (penalty weight {weight}) to {ADAPTER_DIR}")
    del model, opt
print(f"done in {time.perf_counter() - t0:.0f} s")

# %% Task loss and drift per step, one line per penalty weight
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for weight, entry in log.items():
    axes[0].plot(entry["step"], entry["task_loss"], label=f"weight {weight}")
    axes[1].plot(entry["drift_step"], entry["drift"], marker="o", label=f"weight {weight}")
axes[0].set(xlabel="step", ylabel="cross-entropy on pirate answers [nats/token]", title="task loss")
axes[1].set(
    xlabel="step",
    ylabel="KL(P_base || P_tuned) on held-out [nats/token]",
    title="drift from the base model",
)
for ax in axes:
    ax.legend()
fig.tight_layout()
fig.savefig(fig_dir / "task_loss_and_drift.png", dpi=120)
print(f"saved {fig_dir / 'task_loss_and_drift.png'}")
if not matplotlib.get_backend().lower().endswith("agg"):
    plt.show()

# %% Summary: final task loss and drift per weight (what the run measured)
for weight, entry in log.items():
    print(
        f"weight {weight:>4}: final task loss {entry['task_loss'][-1]:.3f}, final drift "
        f"{entry['drift'][-1]:.4f} nats; held-out answer: {entry['sample_answer'][:70]!r}"
    )
atomic_write_json(
    run_dir / "finetune_log.json",
    {
        "metadata": run_metadata(
            "kl_finetune",
            {
                "MODEL": MODEL,
                "PENALTY_WEIGHTS": PENALTY_WEIGHTS,
                "STEPS": STEPS,
                "BATCH_SIZE": BATCH_SIZE,
                "LEARNING_RATE": LEARNING_RATE,
                "TRAIN_LAST_BLOCKS": TRAIN_LAST_BLOCKS,
                "LORA_RANK": LORA_RANK,
                "ADAPTER_DIR": ADAPTER_DIR,
                "DIRECTION": DIRECTION,
                "SEED": SEED,
            },
        ),
        "runs": log,
    },
)
print(f"wrote {run_dir / 'finetune_log.json'}")
