"""Evaluation of code models: HumanEval / MBPP tasks, a sandbox for generated programs, pass@k."""

from phi1.eval.pass_at_k import mean_pass_at_k, pass_at_k
from phi1.eval.sandbox import ExecutionResult, SandboxConfig, run_program, run_programs
from phi1.eval.tasks import Problem, load_humaneval, load_mbpp, load_task

__all__ = [
    "ExecutionResult",
    "Problem",
    "SandboxConfig",
    "load_humaneval",
    "load_mbpp",
    "load_task",
    "mean_pass_at_k",
    "pass_at_k",
    "run_program",
    "run_programs",
]
