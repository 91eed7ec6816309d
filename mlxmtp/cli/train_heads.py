"""`mlxmtp train-heads MODEL -o OUT --corpus FILE`: train MTP heads for a frozen trunk (mlxmtp/train_heads.py)."""

from __future__ import annotations

import click

from ..train_heads import INITS, Recipe, train_heads
from .generate import Command

DEFAULTS = Recipe()


@click.command("train-heads", cls=Command)
@click.argument("model", metavar="MODEL")
@click.option("--out", "-o", required=True, metavar="OUT", help="directory to write the checkpoint with its heads")
@click.option("--corpus", required=True, metavar="PATH",
              help="text file, .jsonl (\"text\" or \"prompt\" per line) or a directory of .py/.txt/.md files")
@click.option("--generate-tokens", type=click.IntRange(min=0), default=DEFAULTS.generate_tokens, show_default=True,
              help="train on this many tokens of the trunk's own generations, prompted from the corpus (0: on the "
                   "corpus itself); generated once and cached in OUT.train-heads/")
@click.option("--gen-temperature", type=click.FloatRange(min=0), default=DEFAULTS.gen_temperature, show_default=True)
@click.option("--modules", type=click.IntRange(min=0), default=0,
              help="MTP modules to train (0: as the config declares; MiniMax-M2: 3)")
@click.option("--init", type=click.Choice(list(INITS)), default=DEFAULTS.init, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULTS.steps, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=DEFAULTS.batch, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=4), default=DEFAULTS.seq_len, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr, show_default=True)
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=1), default=DEFAULTS.eval_every, show_default=True,
              help="steps between held-out acceptance estimates")
@click.option("--teacher-cache", type=click.IntRange(min=0), default=DEFAULTS.teacher_cache, show_default=True,
              metavar="K", help="cache the trunk's hidden states and top-K next-token log-probs on disk once (K >= "
                                "vocab: the full distribution) instead of a trunk forward per step; 0: on the fly")
@click.option("--save-every", type=click.IntRange(min=1), default=DEFAULTS.save_every, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="dtype of the written heads (auto: the trunk's)")
@click.option("--work-dir", metavar="DIR", default=None,
              help="cached generations and resumable state (default: OUT.train-heads beside OUT)")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@click.option("--force-load", is_flag=True, help="train even when the memory estimate says it cannot fit")
def command(model, out, corpus, generate_tokens, gen_temperature, modules, init, steps, batch, seq_len, lr, seed,
            eval_every, teacher_cache, save_every, dtype, work_dir, force, force_load):
    """Train MTP heads for MODEL's frozen trunk by KL distillation to its own next-next-token distribution.

    Rerun the same command to resume an interrupted run (Ctrl-C keeps the last completed step)."""
    recipe = Recipe(modules=modules, init=init, steps=steps, batch=batch, seq_len=seq_len, lr=lr, seed=seed,
                    generate_tokens=generate_tokens, gen_temperature=gen_temperature, eval_every=eval_every,
                    save_every=save_every, teacher_cache=teacher_cache, dtype=dtype)
    r = train_heads(model, out, corpus, recipe, force=force, force_load=force_load, progress=True,
                    work_dir=work_dir)
    held = "; ".join(f"{k}: acceptance {v['acceptance']:.1%}, tau {v['tau']:.2f}" for k, v in r.heldout.items())
    click.echo(f"wrote {r.out} ({r.steps} steps, final loss {r.loss:.4f})" + (f"; held-out greedy {held}" if held else ""))
