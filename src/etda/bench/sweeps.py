"""The declarative sweep tables of ``etda bench``: which configurations run, in which order.

A configuration is a method x ensemble kind x size (plus options); its ``key`` names it in
``results.json``, so a sweep can be extended without recomputing what is there. ``FULL`` is
the benchmark of the issues (TRAK over every ensemble kind and size, the other methods at one
size each); ``QUICK`` a small subset that runs in a few minutes on two cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from etda.ensemble import ENSEMBLES, Ensemble
from etda.experiment import make_ensemble
from etda.methods import METHODS

REGIMES = ("default", "paper")
# The TRAK paper's code base (dattri's TRAK): k = 512 random projections, a projection seed
# per member (etda's members each have their own), and no damping.
PAPER_REGIME = {"proj_dim": 512, "damping": 0.0}


@dataclass(frozen=True)
class BenchConfig:
    """One attribution to run and score: ``models`` trained models x ``members`` each.

    ``members``: per trained model (``None``: the kind's default; checkpoints: checkpoints
    of the run). ``p``: dropout-rate override; ``proj_dim``/``projection``/``damping``: as for
    ``etda attribute`` (``None``/``"auto"``: the library's defaults). ``regime="paper"``: the
    TRAK paper's code base's regime (:data:`PAPER_REGIME`: a k = 512 projection seeded per
    member, no damping) instead of etda's defaults. ``train_fraction``: naive models trained
    on random subsets of that fraction (one per model seed) instead of the whole set.
    """

    method: str
    ensemble: str = "none"
    models: int = 1
    members: int | None = None
    proj_dim: int | None = None
    projection: str = "auto"
    damping: str | None = None
    p: float | None = None
    rank: int | None = None
    lora_epochs: int | None = None
    regime: str = "default"
    train_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {sorted(METHODS)}")
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose from {REGIMES}")
        f = self.train_fraction
        if f is not None and not 0 < f < 1:
            raise ValueError(f"train_fraction must lie in (0, 1), got {f}")
        self.make_ensemble()  # unknown kinds and options fail here, not in the middle of a sweep

    def make_ensemble(self) -> Ensemble:
        """The ensemble object this configuration runs."""
        return make_ensemble(
            self.ensemble, self.members, p=self.p, rank=self.rank, lora_epochs=self.lora_epochs
        )

    @property
    def m(self) -> int:
        """Members per trained model."""
        if self.members is not None:
            return self.members
        return ENSEMBLES.get_entry(self.ensemble).default_members

    @property
    def total_members(self) -> int:
        return self.models * self.m

    @property
    def options(self) -> dict:
        """``proj_dim`` and ``damping`` as run: the regime's where the configuration names
        none."""
        proj_dim, damping = self.proj_dim, self.damping
        if self.regime == "paper":
            proj_dim = PAPER_REGIME["proj_dim"] if proj_dim is None else proj_dim
            damping = PAPER_REGIME["damping"] if damping is None else damping
        return {"proj_dim": proj_dim, "damping": damping}

    @property
    def family(self) -> str:
        """``naive`` for the independent ensemble (``naive-subsets`` on subsets), else the
        kind (``hybrid-`` for K > 1)."""
        if self.ensemble == "none":
            return "naive" if self.train_fraction is None else "naive-subsets"
        return f"hybrid-{self.ensemble}" if self.models > 1 else self.ensemble

    @property
    def key(self) -> str:
        parts = [self.method, self.ensemble, f"k{self.models}", f"m{self.m}"]
        if self.proj_dim is not None:
            parts.append(f"d{self.proj_dim}")
        if self.projection != "auto":
            parts.append(self.projection)
        if self.damping is not None:
            parts.append(f"damp{self.damping}")
        if self.regime != "default":
            parts.append(self.regime)
        if self.train_fraction is not None:
            parts.append(f"frac{self.train_fraction:g}")
        return "/".join(parts + self.make_ensemble().key_parts())

    @property
    def label(self) -> str:
        """Short plot label, e.g. ``naive 5``, ``dropout 10``, ``2x10 dropout``."""
        kind = ENSEMBLES.get_entry(self.ensemble).short
        if self.ensemble == "none":
            label = f"naive {self.models}"
            if self.train_fraction is not None:
                frac = "halves" if self.train_fraction == 0.5 else f"{self.train_fraction:g}"
                label += f" ({frac})"
        elif self.models > 1:
            label = f"{self.models}x{self.m} {kind}"
        else:
            label = f"{kind} {self.m}"
        return label if self.damping is None else f"{label} (damping {self.damping})"

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "m": self.m,
            "key": self.key,
            "label": self.label,
            "family": self.family,
        }


@dataclass(frozen=True)
class MislabelConfig:
    """A mislabel-detection run. ``ensemble="best-dropout"`` takes the dropout configuration
    (one model, same method) with the best LDS in the sweep's results. ``dropout``/``epochs``
    override the model's dropout rate and the recipe's epochs (``epochs_factor`` multiplies
    the setting's epochs): a model that memorizes its noise."""

    method: str = "trak"
    ensemble: str = "none"
    models: int = 1
    members: int | None = None
    p: float | None = None
    fraction: float = 0.1
    seed: int = 0
    dropout: float | None = None
    epochs_factor: int | None = None
    note: str = ""

    @property
    def key(self) -> str:
        parts = [self.method, self.ensemble, f"k{self.models}"]
        if self.members is not None:
            parts.append(f"m{self.members}")
        if self.p is not None:
            parts.append(f"p{self.p:g}")
        parts.append(f"flip{self.fraction:g}-s{self.seed}")
        if self.dropout is not None:
            parts.append(f"dropout{self.dropout:g}")
        if self.epochs_factor is not None:
            parts.append(f"epochs-x{self.epochs_factor}")
        return "/".join(parts)


@dataclass(frozen=True)
class VarianceConfig:
    """The K x M hybrid whose member scores fit the variance theory."""

    method: str = "trak"
    ensemble: str = "dropout"
    models: int = 3
    members: int = 5
    predict_models: tuple[int, ...] = (1, 2, 3, 5, 10)
    predict_members: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 50)
    fallback: str = "lora"  # the kind used when the model cannot make ``ensemble``'s members

    @property
    def key(self) -> str:
        return f"{self.method}/{self.ensemble}/k{self.models}/m{self.members}"


@dataclass(frozen=True)
class Sweep:
    """What ``etda bench`` runs. ``n_subsets``/``seeds_per_subset``: the LDS ground truth the
    sweep was designed for (the CLI's defaults; an explicit option overrides them)."""

    name: str
    configs: tuple[BenchConfig, ...]
    mislabel: tuple[MislabelConfig, ...] = ()
    variance: VarianceConfig | None = None
    n_subsets: int = 50
    seeds_per_subset: int = 1

    @property
    def name_regime(self) -> str:
        """The regime of the sweep's configurations (``"default"`` or ``"paper"``)."""
        regimes = {c.regime for c in self.configs}
        return regimes.pop() if len(regimes) == 1 else "default"

    def only(self, methods: list[str] | None) -> Sweep:
        """The sweep restricted to ``methods`` (None: all)."""
        if not methods:
            return self
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
        keep = set(methods)
        var = self.variance if self.variance and self.variance.method in keep else None
        return replace(
            self,
            configs=tuple(c for c in self.configs if c.method in keep),
            mislabel=tuple(c for c in self.mislabel if c.method in keep),
            variance=var,
        )


def _trak_full() -> list[BenchConfig]:
    # Most informative first: a sweep cut short by its time budget keeps the key rows.
    out = [BenchConfig("trak", "none", k) for k in (1, 2, 5, 10)]
    out += [BenchConfig("trak", "dropout", 1, m) for m in (10, 20)]
    out += [BenchConfig("trak", "checkpoints", 1, 5)]
    out += [BenchConfig("trak", "dropout-forward", 1, m) for m in (10, 20, 50)]
    out += [
        BenchConfig("trak", "dropout", 2, 10),
        # Without a projection every seed gives the same features: project to compare.
        BenchConfig("trak", "projection-seeds", 1, 10, proj_dim=512),
    ]
    out += [BenchConfig("trak", "lora", 1, m) for m in (4, 8)]
    out += [BenchConfig("trak", "dropout-per-example", 1, 10)]
    # The TRAK paper trains its naive models on half subsets: does that help here too?
    out += [BenchConfig("trak", "none", k, train_fraction=0.5) for k in (1, 2, 5)]
    return out


def _trak_full_expensive() -> list[BenchConfig]:
    """The largest TRAK ensembles, run after every other configuration."""
    out = [BenchConfig("trak", "lora", 1, 16), BenchConfig("trak", "dropout-per-example", 1, 20)]
    # 50 fully featurized members cost 50 exact-kernel solves each.
    out += [BenchConfig("trak", kind, 1, 50) for kind in ("dropout", "dropout-per-example")]
    return out


def _others_full() -> list[BenchConfig]:
    out = []
    for method in ("graddot", "gradcos", "if"):
        out += [
            BenchConfig(method, "none", 1),
            BenchConfig(method, "none", 5),
            BenchConfig(method, "dropout", 1, 10),
            BenchConfig(method, "lora", 1, 8),
        ]
    out.append(BenchConfig("tracin", "none", 1))  # 5 checkpoints of one run
    return out


FULL = Sweep(
    "full",
    tuple(_trak_full() + _others_full() + _trak_full_expensive()),
    mislabel=(
        MislabelConfig("trak", "none", 1),
        MislabelConfig("trak", "none", 5),
        MislabelConfig("trak", "best-dropout", 1),
        MislabelConfig("graddot", "none", 1),
        MislabelConfig("trak", "none", 1, dropout=0.0, epochs_factor=3, note="memorizes"),
        MislabelConfig(
            "trak", "dropout", 1, 10, p=0.1, dropout=0.0, epochs_factor=3, note="memorizes"
        ),
    ),
    variance=VarianceConfig("trak", "dropout", 3, 5),
)

QUICK = Sweep(
    "quick",
    (
        BenchConfig("trak", "none", 1),
        BenchConfig("trak", "none", 2),
        BenchConfig("trak", "none", 4),
        BenchConfig("trak", "dropout", 1, 5),
        BenchConfig("trak", "dropout-forward", 1, 5),
        BenchConfig("trak", "dropout-per-example", 1, 3),
        BenchConfig("trak", "lora", 1, 3),
        BenchConfig("trak", "dropout", 2, 3),
        BenchConfig("trak", "projection-seeds", 1, 3, proj_dim=512),
        BenchConfig("trak", "checkpoints", 1, 3),
        BenchConfig("graddot", "none", 1),
        BenchConfig("gradcos", "none", 1),
        BenchConfig("if", "none", 1),
    ),
    mislabel=(
        MislabelConfig("trak", "none", 1),
        MislabelConfig("trak", "best-dropout", 1),
        MislabelConfig("trak", "none", 1, dropout=0.0, epochs_factor=2, note="memorizes"),
    ),
    variance=VarianceConfig("trak", "dropout", 2, 3, predict_models=(1, 2, 5, 10)),
)


def _cnn_full() -> list[BenchConfig]:
    """fmnist2-cnn: every ensemble kind at the sizes two cores afford with exact conv
    features (each fully featurized member costs one n x n kernel over ~10^5-dim gradients).
    The model is trained without dropout; dropout kinds mask its p=0 layer at p=0.1."""
    out = [BenchConfig("trak", "none", k) for k in (1, 2, 4, 8)]
    out += [BenchConfig("trak", "dropout", 1, m) for m in (5, 10)]
    out += [BenchConfig("trak", "checkpoints", 1, m) for m in (3, 5)]
    out += [BenchConfig("trak", "dropout-forward", 1, m) for m in (10, 20)]
    out += [
        BenchConfig("trak", "dropout-per-example", 1, 5),
        BenchConfig("trak", "dropout", 2, 5),
        BenchConfig("trak", "lora", 1, 4),
        BenchConfig("trak", "projection-seeds", 1, 5, proj_dim=512),
    ]
    for method in ("graddot", "gradcos", "if"):
        out += [BenchConfig(method, "none", 1), BenchConfig(method, "none", 4)]
    out += [BenchConfig("if", "dropout", 1, 5), BenchConfig("tracin", "none", 1)]
    return out


# Mislabel and variance runs as in the quick sweep (their records carry over between them).
CNN_FULL = Sweep("full", tuple(_cnn_full()), mislabel=QUICK.mislabel, variance=QUICK.variance)

_SK = {"proj_dim": 2048, "projection": "factored"}  # the sequence sweeps' featurizer


# Sequence log-likelihoods vary with each retraining seed as much as with the subset: two
# seeds per subset halve that noise in the ground truth (and measure it: the noise ceiling).
KJV_QUICK = Sweep(
    "quick",
    (
        BenchConfig("trak", "none", 1, **_SK),
        BenchConfig("trak", "none", 2, **_SK),
        BenchConfig("trak", "dropout", 1, 5, **_SK),
        BenchConfig("trak", "lora", 1, 2, **_SK),
        BenchConfig("gradcos", "none", 1, **_SK),
    ),
    n_subsets=40,
    seeds_per_subset=2,
)


def _text_full() -> list[BenchConfig]:
    """The text settings: every method over naive 1/5 and the cheap kinds that one run or
    adapters give (checkpoints, LoRA), TRAK also over naive 2/3, dropout and a tenth of the
    default damping (a character GPT measured better there), on factored sketches. The rows
    the targets are read from come first: a sweep cut short keeps them."""
    trak = [BenchConfig("trak", "none", k, **_SK) for k in (1, 5)]
    trak += [
        BenchConfig("trak", "checkpoints", 1, 5, **_SK),
        BenchConfig("trak", "lora", 1, 8, **_SK),
    ]
    trak += [BenchConfig("trak", "none", k, **_SK) for k in (2, 3)]
    trak += [
        BenchConfig("trak", kind, k, m, damping="trace:0.1", **_SK)
        for kind, k, m in (
            ("none", 1, None),
            ("none", 5, None),
            ("checkpoints", 1, 5),
            ("lora", 1, 8),
        )
    ]
    others = []
    for method in ("if", "gradcos", "graddot"):
        others += [BenchConfig(method, "none", k, **_SK) for k in (1, 5)]
        others += [BenchConfig(method, "checkpoints", 1, 5, **_SK)]
        others += [BenchConfig(method, "lora", 1, 8, **_SK)]
    others.append(BenchConfig("tracin", "none", 1, **_SK))
    last = [BenchConfig("trak", "lora", 1, 4, **_SK), BenchConfig("trak", "dropout", 1, 10, **_SK)]
    return trak + others + last


TEXT_FULL = Sweep("full", tuple(_text_full()), n_subsets=50, seeds_per_subset=2)
# A GPT-2 retraining takes about twice the character model's (65 vs 33 s per job in the
# committed ground truths): one seed per subset fits two cores.
GPT2_FULL = replace(TEXT_FULL, seeds_per_subset=1)

SWEEPS = {"full": FULL, "quick": QUICK}
SETTING_SWEEPS: dict[str, Sweep] = {
    "fmnist2-cnn": CNN_FULL,
    "kjv-transformer": TEXT_FULL,
    "kjv-gpt2": GPT2_FULL,
}
SETTING_QUICK: dict[str, Sweep] = {"kjv-transformer": KJV_QUICK, "kjv-gpt2": KJV_QUICK}


def _paper(dropout_members: int, lora_members: int) -> tuple[BenchConfig, ...]:
    """TRAK in the paper's regime: naive ensembles on the whole set and on half subsets,
    every seed system of the paper (dropout with masks fixed per member, fresh per example,
    or in the forward pass only; LoRA; a 2 x M hybrid) and etda's checkpoints of one run."""
    p = {"regime": "paper"}
    out = [BenchConfig("trak", "none", k, **p) for k in (1, 2, 5)]
    out += [BenchConfig("trak", "none", k, train_fraction=0.5, **p) for k in (1, 2, 5)]
    out += [
        BenchConfig("trak", kind, 1, dropout_members, **p)
        for kind in ("dropout", "dropout-per-example", "dropout-forward")
    ]
    out += [
        BenchConfig("trak", "lora", 1, lora_members, **p),
        BenchConfig("trak", "dropout-per-example", 2, dropout_members // 2, **p),
        BenchConfig("trak", "checkpoints", 1, 5, **p),
    ]
    return tuple(out)


# (dropout masks, LoRA adapters) per paper-regime ensemble where 10 and 8 cost too much:
# each member of the CNNs is a full conv featurization.
PAPER_MEMBERS = {"fmnist2-cnn": (5, 4), "fmnist2-cnn-dropout": (5, 4)}


def paper_sweep(setting: str | None = None) -> Sweep:
    """The paper-regime sweep of ``setting`` (``etda bench --regime paper``), on the ground
    truth of the setting's own sweep, with :data:`PAPER_MEMBERS`' sizes where it has some."""
    own = SETTING_SWEEPS.get(setting or "", FULL)
    members = PAPER_MEMBERS.get(setting or "", (10, 8))
    return Sweep(
        "paper",
        _paper(*members),
        n_subsets=own.n_subsets,
        seeds_per_subset=own.seeds_per_subset,
    )


def get_sweep(
    quick: bool = False,
    methods: list[str] | None = None,
    setting: str | None = None,
    regime: str = "default",
) -> Sweep:
    """The quick or full sweep (``setting``'s own where it has one; sequence settings have
    no labels to flip, so no mislabel runs), restricted to ``methods`` if given;
    ``regime="paper"``: :func:`paper_sweep` (TRAK only)."""
    if regime == "paper":
        return paper_sweep(setting).only(methods)
    if regime != "default":
        raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}")
    table, default = (SETTING_QUICK, QUICK) if quick else (SETTING_SWEEPS, FULL)
    return table.get(setting or "", default).only(methods)
