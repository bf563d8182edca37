"""The Custom Scalars layout of a run: what TensorBoard's "Custom Scalars" dashboard shows first.

The Scalars dashboard lists tags alphabetically, so ~120 per-layer ``bitnet/...`` cards come before
``train/loss``. This layout (tensorboardX ``add_custom_scalars`` format: category -> chart title ->
``["Multiline", [tag regexes]]``, matched with Python's ``re.match``, in order) puts the curves a
run is judged by first, then the model-wide BitNet statistics, then the per-layer ones, one chart
per statistic with every layer's line in it.
"""

from __future__ import annotations

_NOT_MODEL = r"^bitnet/(?!model/)[^/]+"  # bitnet/<layer path>/<stat>, not bitnet/model/<stat>


CUSTOM_SCALARS: dict[str, dict[str, list]] = {
    "1 training": {
        "loss (train and eval)": ["Multiline", [r"^train/loss$", r"^eval/loss$"]],
        "learning rate": ["Multiline", [r"^train/lr$"]],
        "weight decay": ["Multiline", [r"^train/wd$"]],
        "grad norm": ["Multiline", [r"^train/grad_norm$"]],
        "throughput (tokens/s)": ["Multiline", [r"^train/tokens_per_sec$"]],
        "MFU": ["Multiline", [r"^train/mfu$"]],
    },
    "2 eval": {
        "eval perplexity": ["Multiline", [r"^eval/perplexity$"]],
        "eval loss - mean train loss": ["Multiline", [r"^eval/train_eval_gap$"]],
    },
    "3 progress and time": {
        "step time (ms)": ["Multiline", [r"^train/step_time_ms$"]],
        "periodic work (ms)": ["Multiline", [r"^time/"]],
        "tokens seen": ["Multiline", [r"^train/tokens_seen$"]],
        "stage": ["Multiline", [r"^train/stage$"]],
        "skipped updates and anomalies": ["Multiline", [r"^train/skipped_updates$", r"^anomaly/"]],
    },
    "4 bitnet: model": {
        "ternary fractions (-1, 0, +1)": ["Multiline", [r"^bitnet/model/frac_"]],
        "gamma (mean over layers)": ["Multiline", [r"^bitnet/model/gamma"]],
        "flip rate": ["Multiline", [r"^bitnet/model/flip_rate$"]],
        "latent RMS": ["Multiline", [r"^bitnet/model/latent_rms$"]],
        "activation absmax": ["Multiline", [r"^bitnet/model/act_absmax"]],
    },
    "5 bitnet: per layer": {
        f"{stat} (every layer)": ["Multiline", [rf"{_NOT_MODEL}/{stat}$"]]
        for stat in ("frac_neg", "frac_zero", "frac_pos", "gamma", "flip_rate", "latent_rms",
                     "act_absmax_mean", "act_absmax_max")
    },
}
