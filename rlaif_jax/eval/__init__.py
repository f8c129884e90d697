"""Evaluation: AlpacaEval-style win rates against reference outputs with API judges (or a
reward model), length control, and reports.

    winrate         win rate +- SE (AlpacaEval's), ties 0.5, invalid counted apart
    length_control  the AlpacaEval 2 length-controlled GLM (ours)
    alpaca_eval_lc  the same, computed exactly as alpaca_eval computes it
    reward_score    the reward-model protocol (mean reward, win rate vs the reference)
    evaluate        generate -> judge -> metrics for one checkpoint (gin: `evaluate`)
    settings        EvalJudgeSettings, EvalSamplingSettings: the evaluation's judge and sampling
    report          tables (markdown, CSV) and plots across runs
"""

from rlaif_jax.eval.alpaca_eval_lc import alpaca_eval_lc_win_rate
from rlaif_jax.eval.length_control import estimate_instruction_difficulty, length_controlled_win_rate
from rlaif_jax.winrate import WinRate, preferences_from_verdicts, verdict_win_rate, win_rate

__all__ = [
    "WinRate",
    "alpaca_eval_lc_win_rate",
    "estimate_instruction_difficulty",
    "length_controlled_win_rate",
    "preferences_from_verdicts",
    "verdict_win_rate",
    "win_rate",
]
