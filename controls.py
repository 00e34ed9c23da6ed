"""Beyond the paper's sweeps: controls for what the GPT learned (its untrained copy, its VQ-VAE
alone, low-level vision, the button presses of game replays, and the variance they share with the
GPT), and appendix A's comparison of the modules of one block. 07_sweep.py plans and reports them.
"""
from pathlib import Path

import torch

from common import read_tsv
from paper.experiments import feature_layer
from paper.gpt import GPTPrior

CONTROLS_CLAIM = ("(not the paper's: the paper reports trained models only) The score comes from "
                  "what the GPT learned: the trained model beats its untrained copy, its VQ-VAE "
                  "alone and low-level vision.")


# Beyond the paper's sweeps: controls for what the GPT learned, appendix A's comparison of layers.
EXTRA_EXPERIMENTS = {"controls": ("control", None, "beyond the paper"),
                     "appendix": ("module", None, "Figure 7, appendix A")}


def partition_with(work):
    """The feature sets the controls' variance partition fits with the GPT's (06 --with, in jobs of
    their own), and the model-free controls: low-level vision, and the button presses when the
    stimuli are replays whose inputs 01 recorded (a movie has no buttons)."""
    return ("lowlevel", "buttons") if stimuli_have_buttons(work) else ("lowlevel",)


def stimuli_have_buttons(work):
    """Whether frames/manifest.tsv lists a rendered repetition with its inputs; before 01 has run,
    the paper's data (replays) are assumed."""
    path = Path(work) / "frames" / "manifest.tsv"
    if not path.is_file():
        return True
    frames = read_tsv(path, required=("status",))
    ok = frames[frames["status"] == "ok"]
    return "buttons_path" in ok and ok["buttons_path"].notna().any()


def appendix_layers(config):
    """Appendix A: every module of the block the paper reads (block 4 of 8; the last block of a
    shallower model), as 05 --list-layers names them, then the output of every block (the depth
    profile)."""
    block = int(feature_layer(config, "data").split(".")[2])
    with torch.device("meta"):   # the module names depend on the depth only
        model = GPTPrior(latent_shape=(4, 8, 8), embedding_dim=6, n_codes=8, hidden_dim=12, heads=2,
                         layers=config["layers"], cond_dim=12)
    prefix = f"attn_stack.attn_nets.{block}."
    modules = [name for name, _ in model.named_modules() if name.startswith(prefix)]
    return modules + [f"attn_stack.attn_nets.{i}" for i in range(config["layers"])]
