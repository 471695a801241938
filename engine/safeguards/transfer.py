"""Negative transfer: the fair from-scratch twin of a job, and verdicts against it and against chance.

Torch-free and pure: the driver (``cluster.run.scratch_twin``) trains the twin and reads the labels; this module
says what the twin is (:func:`scratch_job`), judges, and says what it judged on. Four verdicts, checked in
this order:

- *no signal*: neither the pre-trained model nor the scratch twin beats the better of chance (1 / classes)
  and the majority class by two standard errors: nothing was learned, so check the data and labels;
- *positive transfer*: pre-trained beats scratch by more than the margin;
- *negative transfer*: scratch beats pre-trained by more than the margin (only then);
- *no measurable gain*: the difference is within the margin.

The margin is ``safeguards.min_gain`` plus two standard errors of the difference. For metrics that are
proportions over the evaluated rows (accuracy, macro-F1, WER, CER) the standard error is the binomial one,
``sqrt(p (1 - p) / n + s (1 - s) / n)`` (unpaired, so slightly conservative for one shared test set; for
WER and CER ``n`` counts utterances, not words, which is conservative too). Loss and perplexity carry no
standard error here: their margin is ``min_gain`` alone, and the verdict says so.

The gain is always "how much better pre-trained is": pre-trained minus scratch for higher-is-better
metrics, scratch minus pre-trained for lower-is-better ones (loss, perplexity, WER).

Every verdict states its strength, on a three-step scale:

- *clear*: the verdict clears its bar by at least one more standard error (a gain of ``min_gain`` + 3 SE or
  more), and the model it favours beats chance and the majority class by 3 SE or more as well;
- *weak*: the verdict holds, but within one standard error of a bar, or the metric carries no standard error
  here (loss, perplexity): another test sample or seed could flip it. The verdict says what would settle it
  (about how many test rows make a gain of this size clear, more seeds, another split);
- *none*: nothing was shown either way (no signal, or no measurable gain); it says what would settle it too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from engine.config.schema import JobSpec

Z = 2.0
"""Standard errors a difference must exceed to count (about 95% two-sided)."""

PROPORTION_METRICS = ("accuracy", "macro_f1", "wer", "cer")
"""Metrics that are shares of the evaluated rows: a binomial standard error applies."""

CLEAR_SE = 1.0
"""Standard errors beyond a verdict's bar (``Z`` SE) that make it clear rather than weak."""

NAMES = {
    "positive": "positive transfer",
    "no_gain": "no measurable gain",
    "negative": "negative transfer",
    "no_signal": "no signal",
    "above_baseline": "above chance (no scratch twin was trained)",
}
"""Verdict key -> what the report prints."""


def scratch_job(job: JobSpec, out_dir: str, lr: float | None = None, name_suffix: str = "scratch") -> JobSpec:
    """The fair from-scratch twin of ``job``, writing to ``out_dir``.

    The same architecture, data, step budget (``optim`` as it is), regularisation and backend, but: random
    weights with a new head, every layer trainable (no frozen blocks, embeddings or speech feature encoder),
    no adapters, backbone LR ratio 1, and its own learning rate ``lr`` (left empty, the job's ``head_lr``;
    ``cluster.run.scratch_twin`` picks it on validation). No safeguards of its own: forgetting means nothing for
    random weights, and it compares with nothing. It exports a merged model, which the test split scores.
    """
    raw = job.model_dump(mode="json")
    raw["name"] = f"{job.name}-{name_suffix}"
    raw["model"].update(from_scratch=True, head="new")
    raw["finetune"].update(
        strategy="full", freeze_depth=0, freeze_embeddings=False, backbone_lr_ratio=1.0, adapter_lr_ratio=1.0,
        freeze_feature_encoder=False, head_lr=lr if lr is not None else job.finetune.head_lr,
    )
    raw["peft"] = {"method": "none"}
    raw["safeguards"].update(
        compare_scratch=False, track_forgetting=False, max_forgetting=None, unfreeze_every_steps=None, unfreeze_every_epochs=None,
    )
    raw["output"].update(dir=str(out_dir), export="merged")
    raw.pop("tune", None)
    return JobSpec.model_validate(raw)


def gain_of(pretrained: float, scratch: float, mode: str) -> float:
    """How much better pre-trained is than scratch, positive when transfer helped, for either ``mode``."""
    return pretrained - scratch if mode == "max" else scratch - pretrained


def proportion_se(p: float, n: int) -> float:
    """Binomial standard error of a share ``p`` (clamped to 0..1) measured on ``n`` rows."""
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n)


@dataclass(frozen=True)
class Baselines:
    """What a model that learned nothing scores on accuracy: guessing uniformly, or always the majority."""

    num_classes: int
    majority_label: str
    """The most frequent label in the training data."""
    majority: float
    """Accuracy of always predicting ``majority_label`` (on the evaluated labels when known, else training)."""
    source: str
    """Which labels ``majority`` was measured on, e.g. ``test labels``."""

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random guess."""
        return 1.0 / self.num_classes

    @property
    def best(self) -> float:
        """The better of chance and majority: what a model must beat to have learned anything."""
        return max(self.chance, self.majority)

    def threshold(self, n: int) -> float:
        """Accuracy above which a model on ``n`` rows beats :attr:`best` by ``Z`` standard errors."""
        return self.best + Z * proportion_se(self.best, n)


def class_baselines(train_counts: dict[str, int], eval_counts: dict[str, int] | None = None) -> Baselines:
    """Chance and majority-class baselines from label counts (class -> rows).

    Args:
        train_counts: label counts of the training data, every class of the task included (zeros allowed).
        eval_counts: label counts of the evaluated split; the majority baseline is then measured there.
    """
    if len(train_counts) < 2:
        raise ValueError(f"class_baselines: need at least 2 classes, got {sorted(train_counts)}")
    majority_label = max(sorted(train_counts), key=lambda label: train_counts[label])
    counts, source = (eval_counts, "evaluated labels") if eval_counts and sum(eval_counts.values()) else (train_counts, "training labels")
    return Baselines(len(train_counts), majority_label, counts.get(majority_label, 0) / sum(counts.values()), source)


@dataclass(frozen=True)
class TransferVerdict:
    """Pre-trained vs from-scratch (and both vs chance), with every number the verdict rests on."""

    metric: str
    mode: str
    pretrained: float
    scratch: float | None
    n: int | None
    """Rows the values were measured on."""
    gain: float | None
    """How much better pre-trained is (positive is better, whatever the metric's mode)."""
    se: float | None
    """Standard error of the difference (None where the metric has none here)."""
    margin: float
    """Smallest gain counted as real: ``min_gain`` plus ``Z`` standard errors."""
    min_gain: float
    verdict: str
    """``positive``, ``no_gain``, ``negative``, ``no_signal`` or (no twin) ``above_baseline``."""
    baselines: Baselines | None = None
    signal_metric: str | None = None
    """The metric compared with the baselines (accuracy)."""
    pretrained_signal: float | None = None
    scratch_signal: float | None = None
    evaluated_on: str = "test"

    @property
    def name(self) -> str:
        return NAMES[self.verdict]

    @property
    def flagged(self) -> bool:
        """Whether the user should act: anything but positive transfer (or a run above chance without twin)."""
        return self.verdict not in ("positive", "above_baseline")

    def signal_clearance(self, value: float | None) -> float | None:
        """Standard errors by which an accuracy ``value`` clears the baselines' threshold (None without baselines)."""
        if value is None or self.baselines is None or not self.n:
            return None
        se = proportion_se(self.baselines.best, self.n)
        return math.inf if se == 0 else (value - self.baselines.threshold(self.n)) / se

    @property
    def strength(self) -> str:
        """``clear``, ``weak`` or ``none``: how sure the verdict is (the scale is in this module's docstring)."""
        if self.verdict in ("no_signal", "no_gain"):
            return "none"
        favoured = self.scratch_signal if self.verdict == "negative" else self.pretrained_signal
        signal = self.signal_clearance(favoured)
        if self.verdict == "above_baseline":
            return "none" if signal is None else ("clear" if signal >= CLEAR_SE else "weak")
        if not self.se or self.gain is None or (abs(self.gain) - self.margin) / self.se < CLEAR_SE:
            return "weak"
        return "weak" if signal is not None and signal < CLEAR_SE else "clear"

    @property
    def settle(self) -> str | None:
        """What would settle a weak or empty verdict (None for a clear one)."""
        if self.strength == "clear":
            return None
        seeds = "repeat both arms with 2-3 other seeds (seed=N) and another split"
        if self.verdict == "no_signal":
            return f"to settle it: fix what keeps the models at chance first (data, labels, steps); then {seeds}."
        if self.se and self.gain is not None and self.n and abs(self.gain) > self.min_gain:
            rows = math.ceil(self.n * ((Z + CLEAR_SE) * self.se / (abs(self.gain) - self.min_gain)) ** 2)
            if rows > self.n:
                return (f"to settle it: about {rows} test rows (now {self.n}) would make a gain of this size clear "
                        f"(the standard error shrinks as 1/sqrt(rows)), or {seeds}.")
        if self.se is None and self.scratch is not None:
            return f"to settle it: {self.metric} carries no standard error here; {seeds} and compare the spread."
        more = f" (now {self.n})" if self.n else ""
        return f"to settle it: more test rows{more} narrow the margin as 1/sqrt(rows), or {seeds}."

    @property
    def advice(self) -> str:
        """What to do about this verdict."""
        if self.verdict == "positive" and self.strength == "weak":
            return "the pre-trained backbone came out ahead, but only just: treat it as a lead, not a result, until it is settled."
        return {
            "positive": "transfer helped: keep the pre-trained backbone.",
            "no_gain": "the pre-trained backbone did not measurably beat the same architecture trained from scratch: "
                       "the difference is within noise (more test rows would tell them apart); transfer bought nothing measurable here.",
            "negative": "negative transfer: training from scratch was significantly better. Choose a backbone pre-trained on "
                        "data closer to this task, or train from scratch.",
            "no_signal": "no signal: no model beat chance or the majority class significantly. Check the data and labels "
                         "(are the labels aligned with the inputs? enough rows per class?) before judging transfer.",
            "above_baseline": "the model beats chance and the majority class; train the scratch twin (--compare-scratch or "
                              "safeguards.compare_scratch: true) to judge the transfer itself.",
        }[self.verdict]

    def lines(self) -> list[str]:
        """The verdict and the numbers it rests on, one fact per line (plain text, also used in report.md)."""
        where = f"{self.evaluated_on} {self.metric}" + (f", n = {self.n}" if self.n else "")
        out = [f"transfer verdict: {self.name} (strength: {self.strength})"]
        if self.scratch is None:
            out.append(f"{where}: pre-trained {self.pretrained:.4f} (no scratch twin)")
        else:
            better = "higher" if self.mode == "max" else "lower"
            out.append(f"{where} ({better} is better): pre-trained {self.pretrained:.4f}, from scratch {self.scratch:.4f}")
            noise = (f"standard error {self.se:.4f}, margin {self.margin:.4f} = {Z:g} SE + min_gain {self.min_gain:g}"
                     if self.se is not None else f"no standard error for {self.metric}: margin = safeguards.min_gain {self.min_gain:g}")
            out.append(f"gain of pre-trained over scratch {self.gain:+.4f}; {noise}")
        if self.baselines is not None and self.n:
            b = self.baselines
            out.append(
                f"baselines ({self.signal_metric}): chance {b.chance:.4f} ({b.num_classes} classes), majority class "
                f"'{b.majority_label}' {b.majority:.4f} (on the {b.source}); beating them takes > {b.threshold(self.n):.4f}"
            )
            seen = [f"pre-trained {self.pretrained_signal:.4f}"] + ([f"scratch {self.scratch_signal:.4f}"] if self.scratch_signal is not None else [])
            out.append(f"{self.signal_metric}: " + ", ".join(seen))
        out.append(self.advice)
        if self.settle:
            out.append(self.settle)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (``transfer.json``)."""
        record = asdict(self)
        record["name"] = self.name
        record["strength"] = self.strength
        record["settle"] = self.settle
        if self.baselines is not None:
            record["baselines"].update(chance=self.baselines.chance, threshold=self.baselines.threshold(self.n) if self.n else None)
        return record


def beats(value: float, baselines: Baselines, n: int) -> bool:
    """Whether an accuracy ``value`` on ``n`` rows beats the better baseline by ``Z`` standard errors."""
    return value > baselines.threshold(n)


def judge_transfer(
    metric: str, mode: str, pretrained: dict[str, float], scratch: dict[str, float] | None, n: int | None,
    baselines: Baselines | None = None, min_gain: float = 0.0, evaluated_on: str = "test", signal_metric: str = "accuracy",
) -> TransferVerdict:
    """The verdict on ``metric`` from the pre-trained and (optionally) scratch metric dicts of one split.

    The no-signal check runs when ``baselines`` and ``n`` are given and the dicts hold ``signal_metric``.
    """
    p = pretrained[metric]
    s = scratch.get(metric) if scratch else None
    has_signal_check = bool(baselines and n and signal_metric in pretrained)
    p_sig = pretrained.get(signal_metric) if has_signal_check else None
    s_sig = scratch.get(signal_metric) if has_signal_check and scratch else None
    gain = se = None
    margin = min_gain
    if s is not None and not math.isnan(s):
        gain = gain_of(p, s, mode)
        if metric in PROPORTION_METRICS and n:
            se = math.sqrt(proportion_se(p, n) ** 2 + proportion_se(s, n) ** 2)
            margin += Z * se
    if has_signal_check and not beats(p_sig, baselines, n) and (s_sig is None or not beats(s_sig, baselines, n)):
        verdict = "no_signal"
    elif gain is None:
        verdict = "above_baseline"
    elif gain > margin:
        verdict = "positive"
    elif gain < -margin:
        verdict = "negative"
    else:
        verdict = "no_gain"
    return TransferVerdict(
        metric, mode, p, s, n, gain, se, margin, min_gain, verdict, baselines if has_signal_check else None,
        signal_metric if has_signal_check else None, p_sig, s_sig, evaluated_on,
    )


def transfer_verdict(
    metric: str, pretrained: float, scratch: float, mode: str, num_test: int | None = None, min_gain: float = 0.0,
    baselines: Baselines | None = None,
) -> TransferVerdict:
    """:func:`judge_transfer` for one metric given as plain values (it is also the baselines' metric)."""
    return judge_transfer(metric, mode, {metric: pretrained}, {metric: scratch}, num_test, baselines, min_gain)
