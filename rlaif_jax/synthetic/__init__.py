"""A synthetic world for the CPU miniature of the paper: checkable tasks, synthetic
teachers / critic / reference behind the OpenAI-compatible server."""

from rlaif_jax.synthetic.tasks import TASKS, Task, make_instructions, parse_instruction, score

__all__ = ["TASKS", "Task", "make_instructions", "parse_instruction", "score"]
