"""Self-learning: facts recalled per round, and the compute each round spends.

A tiny char-level student (llama family, 2 layers, 64 wide, block 64) trained 300 steps on the
bundled Quijote is run through `semilla.learn` against the tests' own OpenAI-compatible teacher
on loopback, which knows 20 invented facts the student has never seen. The seed's limits stay
as they are (10 questions an hour, 100 a day, 30 s apart) on a simulated clock, so the figures
also say how many hours of questioning the facts take. After each round: how many of the 20
facts the current model recalls (greedy, the fact's key string in the answer), its validation
perplexity on the original data, the gate's decision, and the training compute so far
(steps, tokens, FLOPs = 3 x forward, seconds). Curve to bench/self_learning.png.

    python bench/self_learning.py                   # 4 rounds of 5 questions, about 5 minutes on 2 cores
    python bench/self_learning.py --rounds 2 --steps 200   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import DEMO_TEXT, tiny_configs  # noqa: E402  (the tests' tiny settings)
from learn_helpers import FACTS, SimulatedClock, Teacher, teacher_server  # noqa: E402  (the tests' teacher)

from semilla.api import load  # noqa: E402
from semilla.data import prepare  # noqa: E402
from semilla.learn import learn  # noqa: E402
from semilla.learn.gaps import recall  # noqa: E402
from semilla.learn.gate import validation_ppl  # noqa: E402
from semilla.learn.journal import Journal  # noqa: E402
from semilla.models import count_parameters, flops_per_token  # noqa: E402
from semilla.train import train  # noqa: E402

QUESTIONS = [{"question": f"¿Qué es {c}?", "key": k} for c, k in FACTS.items()]


def student(root: Path) -> Path:
    (root / "quijote.txt").write_text(DEMO_TEXT.read_text(encoding="utf-8"), encoding="utf-8")
    prepare([str(root / "quijote.txt")], str(root / "data"))
    steps = dict(max_iters=300, eval_interval=300, save_interval=300, sample_interval=3000)
    train(*tiny_configs(root / "data", root / "run", n_embd=64, block_size=64, batch_size=16,
                        learning_rate=3e-3, **steps))  # fmt: skip
    return root / "run"


def measure(run: Path, data: Path) -> dict:
    lm = load(str(Journal(run).current_model()), device="cpu")
    return {
        "recalled": round(recall(lm, QUESTIONS, 48) * len(QUESTIONS)),
        "val_ppl": validation_ppl(lm, data, 20000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--questions", type=int, default=5, help="questions per round")
    parser.add_argument("--steps", type=int, default=400, help="training steps per round")
    parser.add_argument("--out", default="bench/results/self_learning.json")
    parser.add_argument("--plot", default="bench/self_learning.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="semilla-learn-bench-"))
    run = student(root)
    (root / "topics.txt").write_text("\n".join(FACTS) + "\n", encoding="utf-8")
    (root / "templates.txt").write_text("¿Qué es {concept}?\n", encoding="utf-8")
    model = load(str(run), device="cpu").model
    flops_per_step = 3 * flops_per_token(model.config, count_parameters(model)) * 16 * 64
    clock = SimulatedClock()
    start = clock.now()
    rows = [{"round": 0, "status": "start", **measure(run, root / "data"), "train_steps": 0, "flops": 0,
             "seconds": 0.0, "hours": 0.0}]  # fmt: skip
    print(f"round 0: {rows[0]['recalled']}/20 facts, val ppl {rows[0]['val_ppl']:.3f}")
    with teacher_server(Teacher("facts")) as url:
        for _ in range(args.rounds):
            began = time.perf_counter()
            [r] = learn(run, teacher_url=url, teacher_model="facts", topics=str(root / "topics.txt"),
                        templates=str(root / "templates.txt"), questions_per_round=args.questions,
                        train_steps=args.steps, learning_rate=2e-3, num_samples=2, max_ppl_rise=0.02,
                        device="cpu", wait=True, clock=clock)["rounds"]  # fmt: skip
            steps = rows[-1]["train_steps"] + args.steps * (r["status"] in ("promoted", "rolled_back"))
            rows.append({"round": r["round"], "status": r["status"], **measure(run, root / "data"),
                         "train_steps": steps, "flops": steps * flops_per_step,
                         "seconds": rows[-1]["seconds"] + time.perf_counter() - began,
                         "hours": (clock.now() - start) / 3600})  # fmt: skip
            x = rows[-1]
            print(f"round {x['round']}: {x['status']}, {x['recalled']}/20 facts, val ppl {x['val_ppl']:.3f}, "
                  f"{x['train_steps']} steps, {x['flops']:.2e} FLOPs, {x['seconds']:.0f} s, "
                  f"{x['hours']:.2f} simulated hours of questions")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rows}, indent=1))
    plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["flops"] for r in rows], [r["recalled"] for r in rows], marker="o", color="tab:green")
    for r in rows:
        ax.annotate(f"round {r['round']}" + (" (rolled back)" if r["status"] == "rolled_back" else ""),
                    (r["flops"], r["recalled"]), textcoords="offset points", xytext=(4, -12), fontsize=8)  # fmt: skip
    ax.set_xlabel("training FLOPs (cumulative)")
    ax.set_ylabel("facts recalled of 20 (greedy)")
    ax.set_ylim(-0.5, 20.5)
    ax.set_title("semilla learn: a tiny student and a teacher of 20 facts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
