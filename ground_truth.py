"""A synthetic dataset's ground truth (00_make_demo.py's ground_truth.json): which parcels follow a
planted signal, read back to tell whether an encoding model found them (06's summary, 07's
controls).
"""
import json
from pathlib import Path

import numpy as np

from common import InputError


def planted_recovery(r, significant, labels, planted_labels, other_signal=frozenset()):
    """How the planted parcels of a synthetic dataset score against its noise parcels.

    r (P,) test r, significant (P,) bool, labels: the atlas label of each of the P columns;
    other_signal: labels planted on something else (the demo's button parcel), neither planted here
    nor noise, and so are the parcels without an r (no data: not scored). The planted parcels are
    recovered when a planted parcel beats a noise parcel in at least 80% of the (planted, noise)
    pairs, i.e. the area under the ROC curve of r as a detector of planted parcels is >= 0.8.
    """
    is_planted = np.array([label in planted_labels for label in labels])
    is_noise = (~is_planted & np.array([label not in other_signal for label in labels])
                & ~np.isnan(r))
    r_planted, r_noise = r[is_planted], r[is_noise]
    beats = (float(np.mean(r_planted[:, None] > r_noise[None, :]))
             if len(r_planted) and len(r_noise) else float("nan"))
    return {"planted_columns": np.flatnonzero(is_planted).tolist(),
            "planted_r_median": float(np.nanmedian(r_planted)),
            "noise_r_median": float(np.nanmedian(r_noise)),
            "noise_r_max": float(np.nanmax(r_noise)),
            "planted_significant": int(significant[is_planted].sum()),
            "n_planted": int(is_planted.sum()),
            "noise_significant": int(significant[is_noise].sum()),
            "n_noise": int(is_noise.sum()),
            "planted_beats_noise": beats, "recovered": bool(beats >= 0.8)}


def read_planted_labels(path, key="planted"):
    """The atlas labels that carry a planted signal in 00_make_demo.py's ground_truth.json: a set of
    ints (06 reports their recovery, 07 compares the controls on them). key "planted": the visual
    parcels; "planted_buttons": those of the button presses (none in a demo made before them)."""
    path = Path(path)
    try:
        truth = json.loads(path.read_text())
        planted = truth[key] if key == "planted" else truth.get(key, {})
        return {int(label) for label in planted}
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise InputError(f"{path}: not a ground truth file (expected JSON with a 'planted' object "
                         f"of atlas labels, as 00_make_demo.py writes)") from None
