"""AlpacaEval 2's length-controlled win rate computed the way alpaca_eval 0.6.6 computes it
(`alpaca_eval.metrics.glm_winrate.get_length_controlled_winrate`), for numbers that can be
put next to its leaderboard. Numpy only; alpaca_eval and scikit-learn are not needed.

What alpaca_eval does, and this module with it:
  * features: std_delta_len = (len(reference) - len(output)) / sd, with sd the sample
    standard deviation over *every* instruction, invalid judgments included; the GLM is
    logit p = w_len * tanh(std_delta_len) + w_diff * difficulty + w_model * 1, no
    intercept (the `not_gamed_baseline` column is the model's intercept).
  * fit: scikit-learn's LogisticRegressionCV, penalty L1 (liblinear), Cs = 10 values
    logspace(-4, 4), 5-fold GroupKFold over instructions, soft labels (each instruction
    twice, label 1 with weight p and label 0 with weight 1 - p), scored by the mean
    soft-label log loss, refit on all rows with the best C. A small best C zeroes every
    coefficient: the LC win rate is then exactly 50.0.
  * invalid judgments (NaN) are left out of the fit only; the LC win rate is the mean of
    sigmoid(w_model + w_diff * difficulty) over *all* instructions.
  * "length_controlled_v1" (alpaca_eval's default) also fits on the rows of df_gamed.csv
    (two length-gamed variants of the baseline, weight 0.2 / 2 each, model column 0):
    they pull the length and difficulty weights toward the baseline's.
  * lc_standard_error there is std(predictions, ddof=1) / sqrt(n): the spread of the
    per-instruction predictions (0 without a difficulty term), not an uncertainty of the
    LC win rate. Here it is called `lc_prediction_standard_error`.

Solvers. solver="liblinear" makes the same scikit-learn calls alpaca_eval makes
(LogisticRegression, L1, liblinear, on the duplicated rows) and seeds them as
LogisticRegressionCV(random_state=123) does: within a fold one RandomState(123) hands each C
in turn the next liblinear seed, and the refit starts a fresh one. liblinear's coordinate
descent visits the features in a seeded random order, so a fresh seed per C can choose
another C. With that seeding the numbers are bit-identical to alpaca_eval's, but it needs
scikit-learn (`pip install -e ".[alpaca-eval]"`). solver="newton" (the default) is numpy
only: liblinear stops at its tolerance (1e-4) where this proximal Newton solver converges to
the optimum of the same objective, so coefficients agree to about 1e-4 and LC win rates to a
few thousandths of a point when the same C is chosen (tests/eval/fixtures/alpaca_eval_lc,
made with alpaca_eval itself; docs/conventions.md has the measured spread). When the length
term carries no information (every output the same number of characters longer than its
reference: the length feature is constant, collinear with the model column) the L1 optimum
is not unique and the two solvers split the weight differently; the LC win rate is then the
solver's choice, not a measurement. The fold assignment is GroupKFold's of scikit-learn >=
1.6 (groups of equal size go to folds in reverse order).

Instruction difficulty comes from alpaca_eval's files, which it downloads from the
Hugging Face hub (dataset tatsu-lab/alpaca_eval) and which we never fetch: df_gamed.csv
(columns model, index, preference, std_delta_len, instruction_difficulty, ...) or
instruction_difficulty.csv (first column the index). Instruction i of the eval set takes
the difficulty at row label i, as alpaca_eval looks it up: so the eval set must be
AlpacaEval's 805 instructions in its order.
"""

from __future__ import annotations

import csv
import math
from typing import Optional, Sequence

import numpy as np

from rlaif_jax import fileio
from rlaif_jax.errors import UserError
from rlaif_jax.eval.length_control import sigmoid

GLMS = ("length_controlled_v1", "length_controlled_noreg", "length_controlled_minimal")
_GAMED_WEIGHT = 0.2 / 2  # regularize_to_baseline_lambda, shared by the two gamed baselines
N_SPLITS = 5
CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV(Cs=10)
LIBLINEAR_SEED = 123  # alpaca_eval's random_state


class AlpacaEvalDataError(UserError):
    """A difficulty / df_gamed file that cannot be used; the message names the file."""


def l1_logistic(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, C: float, tol: float = 1e-12, max_iter: int = 200
) -> np.ndarray:
    """argmin_b |b|_1 + C sum_i w_i [y_i softplus(-x_i b) + (1 - y_i) softplus(x_i b)], soft
    labels y in [0, 1] (liblinear's L1R_LR objective with per-sample C). Proximal Newton:
    a coordinate-descent lasso on the local quadratic model, then a backtracking step."""
    X, y, w = (np.asarray(a, np.float64) for a in (X, y, w))
    d = X.shape[1]

    def F(b):
        z = X @ b
        return C * float(np.sum(w * (y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)))) + float(np.abs(b).sum())

    b = np.zeros(d)
    f = F(b)
    for _ in range(max_iter):
        s = sigmoid(X @ b)
        g = C * (X.T @ (w * (s - y)))
        H = C * (X * (w * s * (1 - s))[:, None]).T @ X + 1e-12 * np.eye(d)
        # min_t g.t + t'Ht/2 + |b + t|_1 by cyclic coordinate descent (d is 2 or 3)
        t = np.zeros(d)
        for _ in range(1000):
            t_old = t.copy()
            for j in range(d):
                r = g[j] + H[j] @ t - H[j, j] * t[j]  # gradient at t_j = 0 (other coords fixed)
                u = b[j] - r / H[j, j]  # unpenalised minimiser in terms of b_j + t_j
                t[j] = np.sign(u) * max(abs(u) - 1.0 / H[j, j], 0.0) - b[j]
            if np.max(np.abs(t - t_old)) <= 1e-15 * (1 + np.max(np.abs(b))):
                break
        decrease = float(g @ t) + float(np.abs(b + t).sum() - np.abs(b).sum())
        if decrease > -1e-16:
            break
        step = 1.0
        while True:
            nb = b + step * t
            nf = F(nb)
            if nf <= f + 1e-4 * step * decrease or step < 1e-10:
                break
            step *= 0.5
        b, f_old, f = nb, f, nf
        if f_old - f <= tol * max(1.0, abs(f)):
            break
    return b


def group_kfold(n: int, n_splits: int = N_SPLITS) -> np.ndarray:
    """Fold of each of n equal-size groups under scikit-learn's GroupKFold (no shuffle): the
    groups sorted by size (stable), taken largest first, each into the lightest fold; with
    equal sizes that is group n-1 -> fold 0, n-2 -> fold 1, ..."""
    if n < n_splits:
        raise ValueError(f"{n} valid judgments cannot be split into {n_splits} folds (alpaca_eval's cross-validation)")
    return (n - 1 - np.arange(n)) % n_splits


def _soft_log_loss(y, q, w):
    # alpaca_eval's logloss_continuous: clip 1e-15, then an unweighted mean of weighted terms
    q = np.clip(q, 1e-15, 1 - 1e-15)
    return -float(np.mean(w * (y * np.log(q) + (1 - y) * np.log(1 - q))))


def _newton(X, y, w, C, random_state=None):
    return l1_logistic(X, y, w, C)


def _liblinear(X, y, w, C, random_state=LIBLINEAR_SEED):
    """scikit-learn's liblinear on the soft labels written as alpaca_eval writes them: every
    row twice, label 1 with weight w p and label 0 with weight w (1 - p), all label-1 copies
    first (the row order liblinear sees is part of its result). random_state: an int (a fresh
    generator) or a np.random.RandomState whose next draw seeds liblinear."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ImportError(
            "solver='liblinear' needs scikit-learn: pip install -e \".[alpaca-eval]\" (or use solver='newton')"
        ) from None
    m = len(y)
    model = LogisticRegression(C=C, penalty="l1", solver="liblinear", fit_intercept=False, random_state=random_state)
    model.fit(np.concatenate([X, X]), np.r_[np.ones(m), np.zeros(m)], sample_weight=np.r_[y * w, (1 - y) * w])
    return model.coef_[0].astype(np.float64)


SOLVERS = {"newton": _newton, "liblinear": _liblinear}


def fit_cv(
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    Cs: Sequence[float] = CS,
    n_splits: int = N_SPLITS,
    solver: str = "newton",
) -> tuple[np.ndarray, float]:
    """LogisticRegressionCV(penalty='l1', cv=GroupKFold(n_splits), refit=True) on soft labels:
    the C with the lowest log loss summed over folds (the first, i.e. smallest, on ties),
    refit on all rows. Returns (coefficients, C). Seeding as scikit-learn's: one generator per
    fold shared by its C values in order (`_logistic_regression_path`), a fresh one for the refit."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    fit = SOLVERS[solver]
    folds = group_kfold(len(y), n_splits)
    loss = np.zeros(len(Cs))
    for k in range(n_splits):
        tr, te = folds != k, folds == k
        rng = np.random.RandomState(LIBLINEAR_SEED)
        for c, C in enumerate(Cs):
            b = fit(X[tr], y[tr], w[tr], C, rng)
            loss[c] += _soft_log_loss(y[te], sigmoid(X[te] @ b), w[te])
    best = int(np.argmin(loss))  # sklearn: argmax of the (negated) summed scores
    return fit(X, y, w, Cs[best], LIBLINEAR_SEED), float(Cs[best])


def _read_csv(path: str) -> tuple[list[str], list[list[str]]]:

    try:
        with fileio.open_file(path, "r") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise AlpacaEvalDataError(f"{path}: cannot read ({e})") from None
    if len(rows) < 2:
        raise AlpacaEvalDataError(f"{path}: empty CSV")
    return rows[0], rows[1:]


def load_df_gamed(path: str) -> dict:
    """alpaca_eval's df_gamed.csv as arrays (preference, std_delta_len,
    instruction_difficulty, index) plus `difficulty`, the per-instruction vector alpaca_eval
    derives from it (the first row of each index, looked up by its row position)."""
    header, rows = _read_csv(path)
    need = ("index", "preference", "std_delta_len", "instruction_difficulty")
    missing = [c for c in need if c not in header]
    if missing:
        raise AlpacaEvalDataError(
            f"{path}: no column(s) {missing}; expected alpaca_eval's df_gamed.csv "
            f"(tatsu-lab/alpaca_eval on the Hugging Face hub), which has {list(need)}"
        )
    col = {c: header.index(c) for c in need}

    def num(r, c, i):
        v = r[col[c]]
        try:
            return float(v) if v != "" else math.nan
        except ValueError:
            raise AlpacaEvalDataError(f"{path}: row {i + 1}: {c}={v!r} is not a number") from None

    out = {c: np.array([num(r, c, i) for i, r in enumerate(rows)]) for c in need}
    first: dict = {}
    for pos, idx in enumerate(out["index"]):
        first.setdefault(idx, pos)
    # drop_duplicates("index")["instruction_difficulty"] keeps the CSV's row labels, and
    # alpaca_eval indexes that Series by instruction position: label i = CSV row i.
    labels = sorted(first.values())
    out["difficulty"] = {pos: float(out["instruction_difficulty"][pos]) for pos in labels}
    return out


def load_instruction_difficulty(path: str) -> dict:
    """{row label: difficulty} from instruction_difficulty.csv (index column first, then the
    difficulty) or from df_gamed.csv."""
    header, rows = _read_csv(path)
    if "std_delta_len" in header:
        return load_df_gamed(path)["difficulty"]
    if len(header) != 2:
        raise AlpacaEvalDataError(
            f"{path}: expected alpaca_eval's instruction_difficulty.csv (two columns: index, "
            f"difficulty) or df_gamed.csv; got columns {header}"
        )
    try:
        return {int(float(r[0])): float(r[1]) for r in rows}
    except (ValueError, IndexError) as e:
        raise AlpacaEvalDataError(f"{path}: not an index,difficulty CSV ({e})") from None


def difficulties(
    glm: str, n: int, df_gamed: Optional[str] = None, difficulty_file: Optional[str] = None
) -> tuple[Optional[dict], Optional[np.ndarray]]:
    """The files `glm` needs, read and checked for n instructions: (df_gamed's table or None,
    the n instructions' difficulties or None). Raises ValueError for a missing argument and
    AlpacaEvalDataError for a file that cannot be used; cheap, so callers run it before any
    judge request (evaluate does)."""
    if glm not in GLMS:
        raise ValueError(f"glm must be one of {GLMS}, got {glm!r}")
    gamed = None
    if glm == "length_controlled_v1":
        if df_gamed is None:
            raise ValueError(
                "glm 'length_controlled_v1' fits on alpaca_eval's df_gamed.csv: pass df_gamed= (download "
                "it from the tatsu-lab/alpaca_eval dataset on the Hugging Face hub), or use glm "
                "'length_controlled_minimal' (no difficulty) instead"
            )
        gamed = load_df_gamed(df_gamed)
        table = gamed["difficulty"]
    elif glm == "length_controlled_noreg":
        if df_gamed is None and difficulty_file is None:
            raise ValueError(
                "glm 'length_controlled_noreg' needs instruction difficulties: pass df_gamed= or "
                "difficulty_file= (alpaca_eval's df_gamed.csv / instruction_difficulty.csv)"
            )
        table = load_df_gamed(df_gamed)["difficulty"] if df_gamed else load_instruction_difficulty(difficulty_file)
    else:
        return None, None
    absent = [i for i in range(n) if i not in table]
    if absent:
        raise AlpacaEvalDataError(
            f"{df_gamed or difficulty_file}: no difficulty for instruction(s) "
            f"{absent[:5]}{'...' if len(absent) > 5 else ''} of {n}; alpaca_eval's files "
            "cover its 805 instructions, in its order"
        )
    return gamed, np.array([table[i] for i in range(n)])


def alpaca_eval_lc_win_rate(
    preferences: Sequence[float],
    len_model: Sequence[float],
    len_ref: Sequence[float],
    glm: str = "length_controlled_v1",
    df_gamed: Optional[str] = None,
    difficulty_file: Optional[str] = None,
    solver: str = "newton",
) -> dict:
    """The LC win rate (percent) of one run as alpaca_eval computes it. preferences: P(policy
    wins) per instruction, NaN = invalid. glm: alpaca_eval's GLM name; length_controlled_v1
    needs `df_gamed` (its df_gamed.csv), length_controlled_noreg needs df_gamed or
    `difficulty_file`, length_controlled_minimal neither. Returns lc_win_rate,
    lc_prediction_standard_error (alpaca_eval's lc_standard_error), coef (model, length,
    difficulty; the length weight on tanh((len_ref - len_model) / sd), alpaca_eval's sign),
    C, n (valid judgments fitted), n_total. solver: "newton" (numpy) or "liblinear"
    (scikit-learn's, bit-identical to alpaca_eval)."""
    if glm not in GLMS:
        raise ValueError(f"glm must be one of {GLMS}, got {glm!r}")
    # alpaca_eval stores 1 + p and subtracts 1 again; repeat it so continuous p round the same
    p = (np.asarray(preferences, np.float64) + 1.0) - 1.0
    lm, lr = np.asarray(len_model, np.float64), np.asarray(len_ref, np.float64)
    if not (p.shape == lm.shape == lr.shape) or p.ndim != 1:
        raise ValueError(
            f"preferences, len_model and len_ref must be 1-D of one length: {p.shape}, {lm.shape}, {lr.shape}"
        )
    n = p.size
    gamed, gamma = difficulties(glm, n, df_gamed, difficulty_file)

    delta = lr - lm
    sd = float(np.std(delta, ddof=1)) if n > 1 else math.nan
    feat = np.tanh(delta / sd)  # over all rows: invalid ones count toward sd (alpaca_eval)
    cols = [feat] + ([gamma] if gamma is not None else []) + [np.ones(n)]
    X, y, w = np.stack(cols, 1), p, np.ones(n)
    if gamed is not None:
        gcols = [np.tanh(gamed["std_delta_len"]), gamed["instruction_difficulty"], np.zeros(len(gamed["index"]))]
        X = np.concatenate([np.stack(gcols, 1), X])
        y = np.concatenate([gamed["preference"], y])
        w = np.concatenate([np.full(len(gamed["index"]), _GAMED_WEIGHT), w])
    keep = ~np.isnan(y) & np.all(np.isfinite(X), 1)
    if not keep[-n:].any():
        return {
            "lc_win_rate": math.nan,
            "lc_prediction_standard_error": math.nan,
            "coef": {},
            "C": math.nan,
            "n": 0,
            "n_total": n,
            "glm": glm,
            "solver": solver,
        }
    b, C = fit_cv(X[keep], y[keep], w[keep], solver=solver)
    test = np.stack([np.zeros(n)] + ([gamma] if gamma is not None else []) + [np.ones(n)], 1)
    pred = sigmoid(test @ b)
    se = float(np.std(pred, ddof=1) / math.sqrt(n)) * 100.0 if n > 1 else math.nan
    coef = {"model": float(b[-1]), "length": float(b[0])}
    if gamma is not None:
        coef["difficulty"] = float(b[1])
    return {
        "lc_win_rate": 100.0 * float(np.mean(pred)),
        "lc_prediction_standard_error": se,
        "coef": coef,
        "C": C,
        "n": int((~np.isnan(p)).sum()),
        "n_total": n,
        "glm": glm,
        "solver": solver,
    }
